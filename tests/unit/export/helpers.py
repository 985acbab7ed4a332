"""Ways to break an artifact on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def perturb_onnx_weight(path: Path, factor: float = 1.05) -> str:
    """Scale the largest float initializer by ``factor`` in place; returns its name."""
    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)) if t.dims else 1)
    array = numpy_helper.to_array(target) * np.float32(factor)
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    onnx.save(model, str(path))
    return target.name
