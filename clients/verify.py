"""``cnnctl verify --server``: check that a running KServe v2 server answers as an artifact says.

The artifact's golden set (export/golden.py) is preprocessed here, with the artifact's own image
spec, and sent as FP32 tensors through the plain v2 protocol (ModelMetadata, ModelConfig,
ModelInfer), so any KServe v2 server can be checked: `cnnctl serve`, or a Triton serving the
artifact's ``--triton`` layout. The answers are judged as the server judges them at load, with the
manifest's tolerance for the precision and device served (cnnctl's ModelConfig says which; other
servers are taken to serve what the artifact's Triton layout holds, fp32, possibly on a GPU, unless
--precision says otherwise).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnnctl.clients.client import Client
from cnnctl.clients.protocol import ModelInfo
from cnnctl.errors import UsageError, VerificationError
from cnnctl.export.golden import compare, has_golden, read_golden, tolerance_for
from cnnctl.export.manifest import load_manifest

CUDA = "CUDAExecutionProvider"


@dataclass
class ServerCheck:
    server: str
    model: str
    version: str  # asked for ("" = the server's choice)
    artifact_dir: str
    passed: bool
    precision: str
    failures: list[str] = field(default_factory=list)
    golden: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        what = f"model '{self.model}'" + (f" version {self.version}" if self.version else "")
        if self.passed:
            return (f"{self.server} {what}: verified against {self.artifact_dir} "
                    f"({self.golden.get('summary', '')}; {self.precision} tolerance)")
        return (f"{self.server} {what} does not match {self.artifact_dir}: "
                f"{'; '.join(self.failures)}")


def _spec_mismatches(info: ModelInfo, manifest: Any) -> list[str]:
    """What the server says about the model that differs from the artifact (shapes; and the
    preprocessing, when the server publishes it as cnnctl does)."""
    out = []
    want_in = tuple(manifest.input.shape[1:])
    got_in = tuple(info.input_shape[1:])
    if got_in != want_in:
        out.append(f"input shape {list(info.input_shape)} on the server, "
                   f"{manifest.input.shape} in the artifact")
    if info.num_classes != manifest.output.shape[-1]:
        out.append(f"{info.num_classes} outputs on the server, {manifest.output.shape[-1]} in "
                   f"the artifact")
    if info.image is not None and asdict(info.image) != asdict(manifest.image):
        diff = [f"{k} {v} (artifact {asdict(manifest.image)[k]})"
                for k, v in asdict(info.image).items() if v != asdict(manifest.image)[k]]
        out.append(f"preprocessing differs: server's {', '.join(diff)}")
    served = info.parameters.get("model")
    if served and served != manifest.model:
        out.append(f"the server's model is a {served}, the artifact's a {manifest.model}")
    return out


def verify_server(server: str, artifact_dir: str | Path, *, model: str | None = None,
                  version: str = "", precision: str | None = None,
                  client: Client | None = None, **client_options: Any) -> ServerCheck:
    """Run ``artifact_dir``'s golden set against ``server``; the check (passed or not)."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)  # every file's sha256, the golden set's included
    if not has_golden(manifest):
        raise UsageError(f"{artifact_dir} has no golden set (exported before cnnctl stored one); "
                         f"re-export it with `cnnctl export` to verify servers against it")
    golden = read_golden(artifact_dir, manifest)
    name = model or manifest.name
    own = client is None
    client = client or Client(server, **client_options)
    try:
        info = client.model_info(name, version)
        served = info.parameters.get("precision", "")
        chosen = precision or served or "fp32"
        check = ServerCheck(server, name, version, str(artifact_dir), False, chosen)
        check.failures = _spec_mismatches(info, manifest)
        if not check.failures:
            logits = client.infer(name, golden.inputs(manifest), version=version)
            # A server that does not say which provider it runs (Triton) may run on a GPU:
            # judged with the GPU tolerance, which still tells another model apart.
            provider = info.parameters.get("execution_provider", "")
            gpu = provider == CUDA if provider else True
            result = compare(logits, golden, tolerance_for(manifest, chosen, gpu=gpu))
            check.failures = result.failures
            check.golden = {"summary": result.summary(), "images": result.images,
                            "max_abs": result.max_abs, "limit_abs": result.limit_abs,
                            "argmax_agreement": result.argmax_agreement,
                            "accuracy": result.accuracy, "golden_accuracy": result.golden_accuracy,
                            "dataset": golden.dataset}
        check.passed = not check.failures
        return check
    finally:
        if own:
            client.close()


def raise_on_mismatch(check: ServerCheck) -> None:
    if not check.passed:
        raise VerificationError(check.line())


def as_json(check: ServerCheck) -> str:
    return json.dumps(check.to_json())
