"""ONNX Runtime sessions: CUDA with the fp16 artifact and IO binding when a GPU is usable, else CPU.

The execution provider is chosen once per process. "Usable" means the CUDA driver library loads
and a CUDA session really initialises: onnxruntime-gpu lists CUDAExecutionProvider on every
machine, and on one without a GPU a session asking for it logs a screenful of errors before
falling back; we probe with the driver first and silence the native stderr while trying.

Every session, the probe's included, is built from the bytes ``read_file`` checked against the
manifest, never from the path: a file replaced after the check is not what ORT loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnctl.errors import ArtifactError, UsageError
from cnnctl.export.manifest import Manifest, read_file

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send fd 2 to /dev/null: native libraries write there directly, past Python's sys.stderr."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


_cuda_lock = threading.Lock()
_cuda_usable: bool | None = None


def _preload_cuda_libraries(ort: Any) -> None:
    """CUDA and cuDNN from pip (``cnnctl[cuda]``: onnxruntime-gpu's cuda and cudnn extras) are
    not on the loader's path; ORT's preload_dlls loads them when installed (ORT >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        with _quiet_stderr():
            preload()
    except Exception as exc:  # noqa: BLE001 - then the system's libraries, or the CPU
        log.debug("onnxruntime.preload_dlls: %s", exc)


def cuda_usable(probe_model: bytes | None = None) -> bool:
    """True when ORT's CUDA provider is listed, the driver loads and a session really uses CUDA."""
    global _cuda_usable
    with _cuda_lock:
        if _cuda_usable is not None:
            return _cuda_usable
        import onnxruntime as ort

        usable = False
        if CUDA in ort.get_available_providers() and _cuda_driver_present() and probe_model:
            _preload_cuda_libraries(ort)
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            try:
                with _quiet_stderr():
                    sess = ort.InferenceSession(probe_model, opts, providers=[CUDA, CPU])
                usable = sess.get_providers()[0] == CUDA
            except Exception:  # noqa: BLE001 - any failure means "not usable"
                usable = False
        _cuda_usable = usable
        return usable


def choose_provider(device: str, probe_model: bytes) -> str:
    if device == "cpu":
        return CPU
    if cuda_usable(probe_model):
        return CUDA
    if device == "cuda":
        raise UsageError("--device cuda: no usable CUDA GPU (onnxruntime's CUDA provider did not "
                         "initialise); use --device auto or cpu")
    return CPU


# Largest model file that also gets a 1-thread session for small batches (bytes): it doubles
# the model's memory.
INLINE_SESSION_MAX_BYTES = 16 << 20
# A batch expected to take one thread at least this long uses every core (s): below it, waking
# the other threads costs more than they save.
PARALLEL_FROM_S = 500e-6


def new_session(model: bytes | Path, providers: list[str], threads: int) -> Any:
    """An ORT session as `cnnctl serve` runs them (bench/serve_speed.py times the same one), from
    the serialized model (what the server passes) or a path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # With 2+ threads, ORT's workers spin between the operators of one run (so that work reaches
    # them without a kernel wake-up) and stop when the run ends (force_spinning_stop): spinning
    # on between batches would take the cores from the gRPC threads.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if threads > 1 else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                   providers=providers)
    # ORT's Python wrapper keeps the serialized model for the session's lifetime for one use:
    # rebuilding the session on the CPU when a CUDA run fails. A server would rather see that
    # batch fail than hold a second copy of every model, so fallback is off and the copy dropped.
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session


def _session(path: Path, data: bytes, providers: list[str], threads: int) -> Any:
    try:
        return new_session(data, providers, threads)
    except Exception as exc:  # noqa: BLE001 - ORT's own error types; the file passed its checks
        message = " ".join(str(exc).split())  # one line: ORT's messages span several
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({message[:300]}); cnnctl serves "
                            f"single-file ONNX models as `cnnctl export` writes them") from None


@dataclass(frozen=True)
class RuntimeInfo:
    provider: str
    precision: str  # of the model file loaded
    path: str
    intra_op_threads: int  # of the session for big batches
    single_thread_session: bool = False  # a second, 1-thread session for small batches
    parallel_from: int = 1  # batches of at least this many images use intra_op_threads


class OrtModel:
    """One ORT session for one artifact, run from a pool of ``instances`` threads."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, device: str = "auto",
                 instances: int = 1, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        fp32 = manifest.file("onnx", "fp32") or manifest.file("onnx")
        if fp32 is None:
            raise ArtifactError(f"{artifact_dir}: the manifest lists no ONNX file; re-export with "
                                f"`cnnctl export --format onnx`")
        if fp32.precision not in ("fp32", "fp16"):
            raise ArtifactError(f"{artifact_dir}: cannot serve an {fp32.precision} ONNX file")
        entry, data = fp32, read_file(artifact_dir, fp32)
        provider = choose_provider(device, data)
        fp16 = manifest.file("onnx", "fp16")
        if provider == CUDA and fp16 is not None and fp16 is not fp32:
            del data  # the fp32 bytes were only the probe's
            entry, data = fp16, read_file(artifact_dir, fp16)
        # A big batch gets every core of its instance, though the gRPC loop shares them; a small
        # one runs in a 1-thread session of its own (model files up to INLINE_SESSION_MAX_BYTES),
        # where waking a second thread costs more than it saves.
        cores = os.cpu_count() or 1
        threads = intra_op_threads or max(1, cores // max(1, instances))
        providers = [CUDA, CPU] if provider == CUDA else [CPU]
        path = artifact_dir / entry.path
        self.session = _session(path, data, providers, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._single = self.session
        self._parallel_from = 1  # images: batches this large use self.session
        if provider == CPU and threads > 1 and len(data) <= INLINE_SESSION_MAX_BYTES:
            self._single = _session(path, data, providers, 1)
        del data  # each session holds its own copy of the model; ours is not needed any more
        if self._single is not self.session:
            self._parallel_from = self._calibrate(manifest)
        self.info = RuntimeInfo(self.session.get_providers()[0], entry.precision, str(path), threads,
                                self._single is not self.session, self._parallel_from)
        self._dtype = np.float16 if entry.precision == "fp16" else np.float32
        self._ort = ort
        self.executor = ThreadPoolExecutor(max_workers=max(1, instances),
                                           thread_name_prefix=f"ort-{manifest.name}")

    def _calibrate(self, manifest: Manifest) -> int:
        """The batch size from which the all-core session is used: where one thread would take
        PARALLEL_FROM_S, timed here on zeros (best of 3 runs of 8 images)."""
        x = np.zeros([8, *manifest.input.shape[1:]], dtype=np.float32)
        feed = {self.input_name: x}
        self._single.run([self.output_name], feed)  # warm-up, not timed
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            self._single.run([self.output_name], feed)
            best = min(best, time.perf_counter() - start)
        return max(1, math.ceil(PARALLEL_FROM_S / (best / 8)))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Blocking: run one batch (N, C, H, W) float32 and return the float32 output. Batches
        smaller than ``parallel_from`` run in the 1-thread session (in the pool or, when cheap
        enough, on the event loop thread: batcher.py), larger ones on every core."""
        x = np.ascontiguousarray(x, dtype=self._dtype)
        if self.info.provider == CUDA:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, x)
            binding.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            session = self.session if x.shape[0] >= self._parallel_from else self._single
            out = session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
