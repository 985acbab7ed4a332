"""PyTorch → TorchScript (traced), with the input spec stored inside the file.

PyTorch deprecates TorchScript (``torch.jit.trace``/``save``/``load`` raise FutureWarning since
2.10-ish and point to ``torch.export``). cnnctl keeps writing it for users who load models with
``torch.jit.load`` (or LibTorch in C++) and will keep it working as long as torch ships it; the
recommended artifacts are the ONNX files (or ``torch.export``/AOTInductor in your own code). The
deprecation warnings are silenced only around our own calls, and said once in the log instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SPEC_NAME = "input_spec.json"
EXPORTER = "torch.jit.trace"
TRACE_BATCH = 2


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation FutureWarnings for the calls inside (we know; see above)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_torchscript(
    model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike[str],
    spec: dict[str, Any],
) -> Path:
    """Trace an eval-mode model and save it with ``spec`` as the extra file ``input_spec.json``.

    The seed models have no data-dependent control flow, so tracing records them exactly; the
    verifier checks that at batch sizes other than the traced one."""
    path = Path(path)
    model = model.eval()
    example = torch.randn(TRACE_BATCH, *input_shape)
    log.info("writing TorchScript (deprecated by PyTorch; ONNX is the recommended artifact)")
    with quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=True)
        torch.jit.save(traced, str(path), _extra_files={SPEC_NAME: json.dumps(spec, indent=2)})
    return path


def load_torchscript(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript file on CPU and the input spec saved inside it."""
    extra = {SPEC_NAME: ""}
    with quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[SPEC_NAME]
    spec = json.loads(raw) if raw else {}
    return module.eval(), spec
