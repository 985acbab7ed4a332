"""Helpers for the tests and bench/ scripts; not part of the installed package.

- make_artifact: a random-weight artifact directory. The real exporter (cnnctl.export) writes
  verified artifacts from trained checkpoints; the server only needs the artifact contract (an ONNX
  file with a dynamic batch dimension + manifest.json), so its tests build that directly and stay
  independent of the exporter.
- config_for / running: a real server on 127.0.0.1:0 in the test's event loop; CliServer: ``cnnctl
  serve`` in a subprocess; infer_request / logits_of / stub: talking to either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec, file_entry, save_manifest
from cnnctl.serving.config import BatchingConfig, LimitsConfig, ServerConfig


def make_artifact(directory: str | Path, model: str = "lenet5", name: str | None = None,
                  version: str = "1", seed: int = 0, golden: bool = True) -> Path:
    """``golden``: store a golden set (random pixels, the eager model's logits), as `cnnctl
    export` stores one of real images."""
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
    if golden:
        from cnnctl.export.golden import GOLDEN_IMAGES, GoldenTolerance, write_golden
        from cnnctl.export.image import to_tensor

        pixels = np.random.default_rng(seed).integers(0, 256, (GOLDEN_IMAGES, h, w, c),
                                                      dtype=np.uint8)
        with torch.no_grad():
            logits = net(torch.from_numpy(to_tensor(list(pixels), manifest.image))).numpy()
        section = write_golden(directory, pixels, logits, None, "random pixels",
                               {"fp32": GoldenTolerance(1e-5, 1e-5, 0.999),
                                "fp32-cuda": GoldenTolerance(1e-2, 1e-2, 0.99)})
        manifest = dataclasses.replace(manifest, golden=section)
    save_manifest(directory, manifest)
    return directory


def rewrite_listed(directory: str | Path, relpath: str) -> None:
    """Make the manifest's sha256 and size of ``relpath`` match the file as it is now: a
    tampered artifact that passes the file checks (what only the golden check can catch)."""
    import json

    from cnnctl.export.manifest import MANIFEST_NAME, sha256_file

    path = Path(directory) / MANIFEST_NAME
    data = json.loads(path.read_text())
    for entry in data["files"]:
        if entry["path"] == relpath:
            entry["sha256"] = sha256_file(Path(directory) / relpath)
            entry["bytes"] = (Path(directory) / relpath).stat().st_size
    path.write_text(json.dumps(data))


def config_for(*dirs: Path, **overrides: Any) -> ServerConfig:
    batching = BatchingConfig(**{k: overrides.pop(k) for k in list(overrides)
                                 if k in BatchingConfig.__dataclass_fields__})
    limits = LimitsConfig(**{k: overrides.pop(k) for k in list(overrides)
                             if k in LimitsConfig.__dataclass_fields__})
    overrides.setdefault("http_port", 0)
    return ServerConfig(artifact_dirs=tuple(str(d) for d in dirs), host="127.0.0.1", port=0,
                        batching=batching, limits=limits, device="cpu", intra_op_threads=1,
                        **overrides)


@contextlib.asynccontextmanager
async def running(config: ServerConfig) -> AsyncIterator[tuple[Any, Any]]:
    """(server, channel) for a started server; stopped (gracefully) on exit."""
    import grpc

    from cnnctl.serving.server import create_server

    server, port = await create_server(config)
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 256 << 20)])
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(grace=5, linger=0)


def infer_request(x: np.ndarray, model: str = "lenet5", version: str = "",
                  name: str = "input", datatype: str = "FP32", rid: str = "") -> Any:
    from cnnctl.protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model, model_version=version, id=rid)
    req.inputs.add(name=name, datatype=datatype, shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def logits_of(resp: Any) -> np.ndarray:
    out = resp.outputs[0]
    return np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


def stub(channel: Any) -> Any:
    from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


class CliServer:
    """``cnnctl serve ... --port 0 --http-port 0`` in a subprocess; the ports are read from its
    startup line (``http_port`` None when it serves no HTTP)."""

    def __init__(self, *args: str, timeout: float = 60.0, python: str | None = None,
                 cwd: str | Path | None = None) -> None:
        import os
        import queue
        import re
        import subprocess
        import sys
        import threading

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", "cnnctl", "-q", "serve", "--host", "127.0.0.1",
             "--port", "0", "--http-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        # A reader thread, not select() on the pipe: a buffered readline may already hold the line.
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                line = None
            if line is None:
                break
            self.lines.append(line)
            found = re.search(r"listening on grpcs?://[^:]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                web = re.search(r" and https?://[^:]+:(\d+)", line)
                self.http_port = int(web.group(1)) if web else None
                return
        self.kill()
        raise RuntimeError("cnnctl serve did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything it printed (complete once it has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(5)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
