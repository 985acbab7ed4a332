"""Random-weight artifact directories for the serving tests and benchmarks.

The real exporter (cnnctl.export) writes verified artifacts from trained checkpoints; the server
only needs the artifact contract (an ONNX file with a dynamic batch dimension + manifest.json), so
its tests build that directly and stay independent of the exporter. Imports torch lazily.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec, file_entry, save_manifest


def make_artifact(directory: str | Path, model: str = "lenet5", name: str | None = None,
                  version: str = "1", seed: int = 0) -> Path:
    import torch

    from cnnctl.training.models import build_model, get_spec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_model(model, check_inputs=False).eval()
    c, h, w = get_spec(model).input_shape
    path = directory / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, c, h, w),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    mean, std = ([0.1307], [0.3081]) if c == 1 else ([0.4914, 0.4822, 0.4465],
                                                      [0.2470, 0.2435, 0.2616])
    manifest = Manifest(
        name=name or model, model=model, version=version,
        files=[file_entry(directory, "model.onnx", "onnx", "fp32")],
        input=TensorSpec("input", "FP32", [-1, c, h, w]),
        output=TensorSpec("logits", "FP32", [-1, 10]),
        image=ImageSpec(channels=c, height=h, width=w, mean=mean, std=std),
        class_names=[str(i) for i in range(10)], opset=17,
    )
    save_manifest(directory, manifest)
    return directory
