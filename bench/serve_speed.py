"""Issue 5, Must show 2: `cnnctl serve` throughput and latency on this machine, in one run.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/serve_speed.py [--seconds 2.5] [--rounds 3]

Every measurement is a closed loop: C concurrent requests in flight from an asyncio gRPC client
in a separate process (this script, `--load` mode), each sending its next request when the last
one is answered (bench/serve_openloop.py adds open-loop traffic, beside closed loops). The client sends pre-serialised ModelInferRequest bytes and does not parse the
answers (the first is checked; a stream's are, for their error message), so it spends as little
of the shared CPU as Python allows.
Comparisons:
  1. lenet5, batch-1 requests: a do-nothing KServe v2 server built from the same stubs (`--null`
     mode: it answers ModelInfer with zeros of the right shape) vs `cnnctl serve`; beside them a
     bare ORT server (`--null --bare-onnx`: reshape, 1-thread ORT on the event loop, answer,
     nothing else), the most any Python server that runs the model per request could reach;
     the three again with Triton's perf_analyzer as the load generator (b1-pa: the reference
     servers answer the metadata it asks for first from constants);
  2. batch-1 requests, dynamic batching on vs off (--no-dynamic-batching), lenet5 and cifar-net-v3;
  3. lenet5, batch-64 requests vs in-process ONNX Runtime at batch 64 (same session options):
     tensors in the messages, and through POSIX shared memory (Triton's system shared-memory
     extension, `cnnctl serve --allow-shared-memory`), where a 256 KB input crosses no socket.
  4. (stream, stream-pa) the lenet5 batch-1 servers of 1. and the shared-memory batch-64 point of
     3. again with every request a message on a ModelStreamInfer stream, one stream per client
     connection (ours and perf_analyzer --streaming): gRPC's per-call cost paid once per stream.
Every server stays up and the points are measured round-robin --rounds times (median kept), the
in-process reference included, so that drifting load from other processes on the shared CPUs hits
every setup alike.
Writes bench/results/serve_speed.json (+ .png plot) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
RESULTS = ROOT / "bench" / "results" / "serve_speed.json"
CONCURRENCY = (1, 8, 64)
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


# ---------------------------------------------------------------- load generator (its own process)
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(address: str, model: str, shape: list[int], concurrency: int, seconds: float,
                warmup: float, server_pid: int | None = None,
                shm: bool = False, stream: bool = False) -> dict[str, float]:
    """``shm``: pass the tensors through POSIX shared memory (Triton's system shared-memory
    extension) instead of the messages: one input region all requests read, and an output slot
    per in-flight request. ``stream``: each of the ``concurrency`` workers sends its requests
    over a ModelStreamInfer stream of its own, one at a time (as perf_analyzer --streaming),
    instead of one ModelInfer call each."""
    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb

    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out_bytes = shape[0] * 10 * 4
    payloads = []
    for i in range(concurrency):
        req = pb.ModelInferRequest(model_name=model)
        tensor = req.inputs.add(name="input", datatype="FP32", shape=shape)
        if shm:
            tensor.parameters["shared_memory_region"].string_param = "bench_in"
            tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
            out = req.outputs.add(name="logits")
            out.parameters["shared_memory_region"].string_param = "bench_out"
            out.parameters["shared_memory_byte_size"].int64_param = out_bytes
            out.parameters["shared_memory_offset"].int64_param = i * out_bytes
        else:
            req.raw_input_contents.append(x.tobytes())
        payloads.append(req.SerializeToString())
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        if shm:
            await _shm_setup(stack, channel, x, concurrency * out_bytes)
        call = channel.unary_unary(INFER)  # bytes in, bytes out
        first = pb.ModelInferResponse.FromString(await call(payloads[0], timeout=30))
        assert list(first.outputs[0].shape) == [shape[0], 10], first
        open_stream = channel.stream_stream(STREAM_INFER)
        latencies: list[float] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from = start + warmup
        end = measure_from + seconds

        cpu: list[float] = []

        async def server_cpu() -> None:
            # The server's CPU over the measured window: robust to the shared machine's load,
            # unlike throughput, since other processes' work is not charged to it.
            await asyncio.sleep(max(0.0, measure_from - loop.time()))
            cpu.extend((cpu_seconds(server_pid), time.process_time()))  # type: ignore[arg-type]
            await asyncio.sleep(max(0.0, end - loop.time()))
            cpu.extend((cpu_seconds(server_pid), time.process_time()))  # type: ignore[arg-type]

        async def worker(payload: bytes) -> None:
            if stream:
                answers = open_stream()
            for _ in range(10_000_000):  # bounded; the clock ends it
                t0 = loop.time()
                if t0 >= end:
                    break
                if stream:
                    await answers.write(payload)
                    answer = pb.ModelStreamInferResponse.FromString(await answers.read())
                    assert not answer.error_message, answer.error_message
                else:
                    await call(payload, timeout=30)
                if t0 >= measure_from:
                    latencies.append(loop.time() - t0)
            if stream:
                await answers.done_writing()

        probes = [server_cpu()] if server_pid else []
        await asyncio.gather(*(worker(p) for p in payloads), *probes)
    lat = np.asarray(latencies)
    out = {"requests": len(lat), "seconds": seconds, "req_per_s": len(lat) / seconds,
           "img_per_s": len(lat) * shape[0] / seconds,
           "p50_ms": float(np.percentile(lat, 50) * 1e3),
           "p99_ms": float(np.percentile(lat, 99) * 1e3)}
    if cpu:
        out["server_cpu_us_per_req"] = (cpu[2] - cpu[0]) * 1e6 / max(1, len(lat))
        out["client_cpu_us_per_req"] = (cpu[3] - cpu[1]) * 1e6 / max(1, len(lat))
    return out


async def _shm_setup(stack: contextlib.AsyncExitStack, channel: Any, x: np.ndarray,
                     out_bytes: int) -> None:
    """Create and register the input region (holding ``x``) and the output region; undone on
    the stack's exit."""
    from multiprocessing import shared_memory

    from cnnctl.protos import grpc_service_pb2 as pb
    from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    for name, size in (("bench_in", x.nbytes), ("bench_out", out_bytes)):
        seg = shared_memory.SharedMemory(name=f"cnnctl_bench_{os.getpid()}_{name}", create=True,
                                         size=size)
        stack.callback(seg.unlink)
        stack.callback(seg.close)
        if name == "bench_in":
            np.ndarray(x.shape, x.dtype, buffer=seg.buf)[...] = x
        await stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=name, key="/" + seg.name, byte_size=size))
        stack.push_async_callback(stub.SystemSharedMemoryUnregister,
                                  pb.SystemSharedMemoryUnregisterRequest(name=name))


def measure(address: str, model: str, shape: list[int], concurrency: int, seconds: float,
            warmup: float = 1.0, server_pid: int | None = None,
            shm: bool = False, stream: bool = False) -> dict[str, float]:
    pid = ["--server-pid", str(server_pid)] if server_pid else []
    out = subprocess.run(
        [sys.executable, __file__, "--load", address, "--model", model, "--shape",
         ",".join(map(str, shape)), "--concurrency", str(concurrency), "--seconds", str(seconds),
         "--warmup", str(warmup), *pid, *(["--shm"] if shm else []),
         *(["--stream"] if stream else [])], capture_output=True,
        text=True, timeout=seconds + warmup + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- the reference servers
async def _reference_server(onnx: str | None) -> None:
    """KServe v2 built from the same stubs, doing the least a server can. Without ``onnx``: the
    do-nothing server, answering ModelInfer with zeros - the RPC stack's own ceiling. With it: the
    bare ORT server, which only reshapes the raw input, runs it through a 1-thread ORT session on
    the event loop and answers - no validation, batching, metrics, deadlines or shutdown logic:
    the ceiling of any Python server that runs this model per request."""
    import signal

    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb
    from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc

    session = None
    if onnx is not None:
        session = _ort_session(onnx, threads=1)

    class Reference(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> object:
            shape = list(request.inputs[0].shape)
            if session is None:
                out = bytes(4 * 10 * shape[0])
            else:
                x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
                out = session.run(None, {"input": x})[0].tobytes()
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                         id=request.id)
            resp.outputs.add(name="logits", datatype="FP32", shape=[shape[0], 10])
            resp.raw_output_contents.append(out)
            return resp

        async def ModelStreamInfer(self, request_iterator: Any, context: object) -> Any:
            # One request at a time, each answered before the next is read: nothing here waits.
            async for request in request_iterator:
                yield pb.ModelStreamInferResponse(
                    infer_response=await self.ModelInfer(request, context))

        # What perf_analyzer asks before it sends load, answered from constants so that it can
        # drive these servers too; none of it is on the ModelInfer path.
        async def ServerMetadata(self, request: object, context: object) -> object:
            return pb.ServerMetadataResponse(name="reference", version="0")

        async def ModelMetadata(self, request: object, context: object) -> object:
            T = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name="lenet5", versions=["1"], platform="onnxruntime_onnx",
                inputs=[T(name="input", datatype="FP32", shape=[-1, 1, 32, 32])],
                outputs=[T(name="logits", datatype="FP32", shape=[-1, 10])])

        async def ModelConfig(self, request: object, context: object) -> object:
            from cnnctl.protos import model_config_pb2 as mc

            config = mc.ModelConfig(name="lenet5", platform="onnxruntime_onnx", max_batch_size=64)
            config.input.add(name="input", data_type=mc.TYPE_FP32, dims=[1, 32, 32])
            config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[10])
            return pb.ModelConfigResponse(config=config)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Reference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on grpc://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


class ReferenceServer:
    """The do-nothing server, or with ``onnx`` the bare ORT server, in a process of its own."""

    def __init__(self, onnx: Path | None = None) -> None:
        import re

        extra = ["--bare-onnx", str(onnx)] if onnx is not None else []
        self.proc = subprocess.Popen([sys.executable, __file__, "--null", *extra],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        self.port = int(re.search(r":(\d+)$", line.strip()).group(1))  # type: ignore[union-attr]
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> ReferenceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---------------------------------------------------------------- in-process ORT reference
def ort_inprocess(path: Path, shape: list[int], seconds: float) -> dict[str, float]:
    """The best of 1 thread, all cores as `cnnctl serve` sets them (spinning only while a run
    computes) and all cores with ORT's own defaults (workers spin on after a run): the reference
    should be ORT at its fastest here, and alone in its process nothing needs the spinning cores."""
    cores = os.cpu_count() or 1
    variants = [(1, "serve")] + ([(cores, "serve"), (cores, "ort-default")] if cores > 1 else [])
    runs = [_ort_inprocess(path, shape, seconds / 2, t, o) for t, o in variants]
    return max(runs, key=lambda r: r["img_per_s"])


def _ort_session(path: str | Path, threads: int, options: str = "serve") -> Any:
    """A CPU session with `threads` intra-op threads: the one `cnnctl serve` makes
    (serving/runtime.py: workers spin only during a run), or one with ORT's own defaults."""
    if options == "serve":
        from cnnctl.serving.runtime import CPU, new_session

        return new_session(Path(path), [CPU], threads)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_inprocess(path: Path, shape: list[int], seconds: float, threads: int,
                   options: str = "serve") -> dict[str, float]:
    sess = _ort_session(path, threads, options)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for _ in range(10):
        sess.run(None, {"input": x})
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and len(lat) < 1_000_000:
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        lat.append(time.perf_counter() - t0)
    a = np.asarray(lat)
    return {"requests": len(a), "seconds": float(a.sum()), "req_per_s": len(a) / a.sum(),
            "img_per_s": len(a) * shape[0] / a.sum(), "p50_ms": float(np.percentile(a, 50) * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3), "threads": threads,
            "options": options}


# ---------------------------------------------------------------- the run
# Short names for --only: the setups this script can measure.
SETUPS = ("null", "bare", "on-lenet5", "off-lenet5", "on-cifar", "off-cifar", "b64", "b64-shm",
          "b64-pa", "b1-pa", "stream", "stream-pa", "ort")
SHM_SETUP = "cnnctl shared memory"  # batch-64 requests whose tensors go through shared memory
# The batch-64 points again with Triton's perf_analyzer (C++) as the load generator, tensors in the
# messages and through shared memory (b64-pa; needs libb64-0d and nvidia-cuda-runtime-cu12).
# And the batch-1 comparison of target 1 (b1-pa): the three servers driven by perf_analyzer, whose
# C++ client leaves more of the two cores to the server than ours does.
PA_SHM = ("--shared-memory", "system", "--output-shared-memory-size", str(64 * 10 * 4))
PA_SETUPS = {"cnnctl, perf_analyzer": ("cnnctl batching on", ()),
             "cnnctl shared memory, perf_analyzer": (SHM_SETUP, PA_SHM),
             "null server, perf_analyzer": ("null server", ()),
             "bare ORT server, perf_analyzer": ("bare ORT server", ())}
PA_SHM_SETUP = "cnnctl shared memory, perf_analyzer"
B64_PA = ("cnnctl, perf_analyzer", PA_SHM_SETUP)
B1_PA = ("null server, perf_analyzer", "bare ORT server, perf_analyzer", "cnnctl, perf_analyzer")
# The same requests over ModelStreamInfer (stream, stream-pa): each client connection keeps a
# stream open and sends its next request when the last is answered, so the per-call cost of
# gRPC (a new HTTP/2 stream, its headers and trailers) is paid once per connection, not per
# request. Ours: setup -> the server it loads; perf_analyzer's with --streaming.
STREAMING = {"null server, streaming": "null server",
             "bare ORT server, streaming": "bare ORT server",
             "cnnctl batching on, streaming": "cnnctl batching on",
             "cnnctl shared memory, streaming": SHM_SETUP}
for _name, (_target, _flags) in list(PA_SETUPS.items()):
    PA_SETUPS[f"{_name} streaming"] = (_target, (*_flags, "--streaming"))


def git_revision(repo: Path = ROOT) -> str:
    """The commit of ``repo`` the benchmark ran on, "+dirty" when its working tree differs."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def run_all(seconds: float, rounds: int, only: tuple[str, ...] = SETUPS,
            concurrency: tuple[int, ...] = CONCURRENCY,
            server_args: tuple[str, ...] = ()) -> dict[str, object]:
    from tests.support.serving import CliServer, make_artifact

    start_load = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    code = git_revision()  # now: the tree may change while the benchmark runs
    work = Path(tempfile.mkdtemp(prefix="serve-speed-"))
    print("building random-weight artifacts (lenet5, cifar-net-v3)...", flush=True)
    arts = {"lenet5": make_artifact(work / "lenet5", "lenet5"),
            "cifar-net-v3": make_artifact(work / "cifar", "cifar-net-v3")}
    shapes = {"lenet5": [1, 32, 32], "cifar-net-v3": [3, 32, 32]}
    rows: list[dict[str, object]] = []

    def record(setup: str, model: str, batch: int, conc: int, res: dict[str, float]) -> None:
        row = {"setup": setup, "model": model, "request_batch": batch, "concurrency": conc, **res}
        rows.append(row)
        cpu = res.get("server_cpu_us_per_req")
        cpu_text = f"  server CPU {cpu:6.0f} µs/req" if cpu is not None else ""
        print(f"  {setup:28s} {model:13s} b{batch:<3d} c{conc:<3d} {res['img_per_s']:9.0f} img/s "
              f"{res['req_per_s']:8.0f} req/s  p50 {res['p50_ms']:7.2f} ms  p99 "
              f"{res['p99_ms']:7.2f} ms{cpu_text}", flush=True)

    # Every server stays up for the whole run and the points are measured round-robin, `rounds`
    # times, keeping each point's median: the CPUs are shared with other work whose load drifts
    # over minutes, and interleaving spreads that drift evenly over the setups being compared.
    cnnctl = {  # short name -> (setup, model, extra serve flags)
        "on-lenet5": ("cnnctl batching on", "lenet5", ()),
        "off-lenet5": ("cnnctl batching off", "lenet5", ("--no-dynamic-batching",)),
        "on-cifar": ("cnnctl batching on", "cifar-net-v3", ()),
        "off-cifar": ("cnnctl batching off", "cifar-net-v3", ("--no-dynamic-batching",)),
    }
    with contextlib.ExitStack() as stack:
        print("starting servers...", flush=True)
        servers = {}
        points = []
        streams = {"stream", "stream-pa"} & set(only)
        if "null" in only or "b1-pa" in only or streams:
            servers[("null server", "lenet5")] = stack.enter_context(ReferenceServer())
        if "null" in only:
            points += [("null server", "lenet5", 1, c) for c in concurrency]
        if "bare" in only or "b1-pa" in only or streams:
            servers[("bare ORT server", "lenet5")] = stack.enter_context(
                ReferenceServer(arts["lenet5"] / "model.onnx"))
        if "bare" in only:
            points += [("bare ORT server", "lenet5", 1, c) for c in concurrency]
        needs_on = {"b64", "b64-pa", "b1-pa", "stream", "stream-pa"}
        for short, (setup, model, flags) in cnnctl.items():
            if short in only or (short == "on-lenet5" and needs_on & set(only)):
                servers[(setup, model)] = stack.enter_context(CliServer(
                    str(arts[model]), "--device", "cpu", *flags, *server_args))
            if short in only:
                points += [(setup, model, 1, c) for c in concurrency]
        if "b64" in only:
            points += [("cnnctl batching on", "lenet5", 64, c) for c in concurrency]
        if "b64-shm" in only or "b64-pa" in only or streams:
            servers[(SHM_SETUP, "lenet5")] = stack.enter_context(CliServer(
                str(arts["lenet5"]), "--device", "cpu", "--allow-shared-memory", *server_args))
        if "b64-shm" in only:
            points += [(SHM_SETUP, "lenet5", 64, c) for c in concurrency]
        if "b64-pa" in only:
            points += [(name, "lenet5", 64, c) for name in B64_PA for c in concurrency]
        if "b1-pa" in only:
            points += [(name, "lenet5", 1, c) for name in B1_PA for c in concurrency]
        if "stream" in only:
            points += [(name, "lenet5", 64 if target == SHM_SETUP else 1, c)
                       for name, target in STREAMING.items() for c in concurrency]
        if "stream-pa" in only:
            points += [(f"{name} streaming", "lenet5", batch, c)
                       for name, batch in (*((n, 1) for n in B1_PA), (PA_SHM_SETUP, 64))
                       for c in concurrency]
        if "ort" in only:  # the reference, in this process, in the same rounds as the servers
            points += [("in-process ORT", model, batch, 1) for model, batch in (
                ("lenet5", 64), ("lenet5", 1), ("cifar-net-v3", 1), ("cifar-net-v3", 64))]
        samples: dict[tuple[str, str, int, int], list[dict[str, float]]] = {p: [] for p in points}
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for point in points:
                setup, model, batch, c = point
                if setup == "in-process ORT":
                    res = ort_inprocess(arts[model] / "model.onnx", [batch, *shapes[model]],
                                        seconds)
                elif setup in PA_SETUPS:
                    target, flags = PA_SETUPS[setup]
                    res = _perf_analyzer(servers[(target, model)].address, model, batch, c,
                                         seconds, flags)
                    if res is None:
                        continue  # no stable measurement: this round is left out
                else:
                    target = STREAMING.get(setup, setup)
                    server = servers[(target, model)]
                    res = measure(server.address, model, [batch, *shapes[model]], c, seconds,
                                  server_pid=server.proc.pid, shm=target == SHM_SETUP,
                                  stream=setup in STREAMING)
                samples[point].append(res)
        for point in points:
            if not samples[point]:
                continue
            runs = sorted(samples[point], key=lambda res: res["img_per_s"])
            median = dict(runs[len(runs) // 2])
            median["rounds_img_per_s"] = [round(res["img_per_s"]) for res in samples[point]]
            median["rounds_p99_ms"] = [round(res["p99_ms"], 2) for res in samples[point]]
            if "server_cpu_us_per_req" in median:
                median["rounds_server_cpu_us_per_req"] = [
                    round(res["server_cpu_us_per_req"]) for res in samples[point]]
            record(*point, median)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "started": started, "code": code,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "gpu": "none (CPUExecutionProvider)"},
        "load_generator": "asyncio grpc client in a separate process (bench/serve_speed.py "
                          "--load); the ', perf_analyzer' setups: Triton's perf_analyzer",
        "seconds_per_point": seconds, "rounds": rounds, "server_args": list(server_args),
        "load_average_at_start": start_load,
        "load_average_at_end": os.getloadavg(), "rows": rows,
    }


def _perf_analyzer(address: str, model: str, batch: int, concurrency: int, seconds: float,
                   flags: tuple[str, ...]) -> dict[str, float] | None:
    if str(Path(__file__).parent) not in sys.path:  # bench/ is not a package
        sys.path.insert(0, str(Path(__file__).parent))
    from client_vs_perf_analyzer import run_perf_analyzer

    res = run_perf_analyzer(address, model, concurrency, int(seconds * 1000), batch, flags)
    if res is None:
        return None
    return {"img_per_s": res["images_per_s"], "req_per_s": res["images_per_s"] / batch,
            "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"]}


def table(result: dict[str, object]) -> str:
    lines = ["| setup | model | request batch | concurrency | img/s | req/s | p50 ms | p99 ms | "
             "server CPU µs/req | img/s of the rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:  # type: ignore[union-attr]
        cpu = r.get("server_cpu_us_per_req")
        rounds = r.get("rounds_img_per_s")
        lines.append(f"| {r['setup']} | {r['model']} | {r['request_batch']} | {r['concurrency']} | "
                     f"{r['img_per_s']:.0f} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {'-' if cpu is None else f'{cpu:.0f}'} | "
                     f"{'-' if rounds is None else ', '.join(map(str, rounds))} |")
    return "\n".join(lines)


# Below each panel: inside, seven lines hide some of the points whichever corner they take.
LEGEND = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncol": 2}


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]  # type: ignore[index]
    big = [r for r in rows if r["request_batch"] == 64 and r["setup"] != "in-process ORT"]
    fig, axes = plt.subplots(1, 3 if big else 2, figsize=(16 if big else 11, 5.5))
    if big:
        ax = axes[2]
        for i, setup in enumerate(dict.fromkeys(r["setup"] for r in big)):
            pts = [r for r in big if r["setup"] == setup]
            ax.plot([r["img_per_s"] for r in pts], [r["p99_ms"] for r in pts], marker="o",
                    label=setup, color=f"C{i + 4}")
            for r in pts:
                ax.annotate(f"c{r['concurrency']}", (r["img_per_s"], r["p99_ms"]), fontsize=8)
        ref = [r for r in rows if r["setup"] == "in-process ORT" and r["model"] == "lenet5"
               and r["request_batch"] == 64]
        if ref:
            ax.axvline(ref[0]["img_per_s"], color="k", lw=1, label="in-process ORT")
            ax.axvline(0.6 * ref[0]["img_per_s"], color="k", lw=1, ls="--", label="0.6x of it")
        ax.set(title="lenet5, batch-64 requests", xlabel="images/s", ylabel="p99 latency (ms)",
               yscale="log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v / 1000:.0f}k"))
        ax.legend(**LEGEND)
    for ax, model in zip(axes, ("lenet5", "cifar-net-v3")):
        for setup, color, style in (
                ("null server", "C0", "-"), ("bare ORT server", "C1", "-"),
                ("cnnctl batching on", "C2", "-"), ("cnnctl batching off", "C3", "-"),
                ("null server, perf_analyzer", "C0", "--"),
                ("bare ORT server, perf_analyzer", "C1", "--"),
                ("cnnctl, perf_analyzer", "C2", "--"),
                ("null server, streaming", "C0", ":"), ("bare ORT server, streaming", "C1", ":"),
                ("cnnctl batching on, streaming", "C2", ":"),
                ("null server, perf_analyzer streaming", "C0", "-."),
                ("bare ORT server, perf_analyzer streaming", "C1", "-."),
                ("cnnctl, perf_analyzer streaming", "C2", "-.")):
            pts = [r for r in result["rows"] if r["setup"] == setup and r["model"] == model  # type: ignore[index, union-attr]
                   and r["request_batch"] == 1]
            if pts:
                ax.plot([r["img_per_s"] for r in pts], [r["p99_ms"] for r in pts], marker="o",
                        label=setup, color=color, ls=style)
                for r in pts:
                    ax.annotate(f"c{r['concurrency']}", (r["img_per_s"], r["p99_ms"]), fontsize=8)
        ax.set(title=f"{model}, batch-1 requests", xlabel="images/s", ylabel="p99 latency (ms)",
               yscale="log")
        ax.legend(**LEGEND)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.5, help="measured seconds per point")
    p.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median kept)")
    p.add_argument("--only", default=",".join(SETUPS),
                   help=f"comma-separated subset of: {', '.join(SETUPS)} (default: all)")
    p.add_argument("--levels", default=",".join(map(str, CONCURRENCY)),
                   help="comma-separated concurrency levels")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="extra `cnnctl serve` flag for every cnnctl setup (repeatable), e.g. "
                   "--server-arg=--inline-below-us=100")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON (+ .png)")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: redraw JSON's plot (next to it) and print its table")
    p.add_argument("--load", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--null", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bare-onnx", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="lenet5", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="1,1,32,32", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--shm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.null:
        asyncio.run(_reference_server(args.bare_onnx))
        return
    if args.load:
        shape = [int(s) for s in args.shape.split(",")]
        print(json.dumps(asyncio.run(_load(args.load, args.model, shape, args.concurrency,
                                           args.seconds, args.warmup, args.server_pid,
                                           args.shm, args.stream))))
        return
    if args.replot:
        try:
            saved = json.loads(args.replot.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--replot {args.replot}: {exc}")
        if not isinstance(saved, dict) or "rows" not in saved:
            p.error(f"--replot {args.replot}: not a serve_speed result (no 'rows')")
        plot(saved, args.replot.with_suffix(".png"))
        print(table(saved))
        return
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SETUPS]
    if unknown:
        p.error(f"--only: unknown setup {unknown[0]!r}; known: {', '.join(SETUPS)}")
    levels = tuple(int(c) for c in args.levels.split(","))
    result = run_all(args.seconds, args.rounds, only, levels, tuple(args.server_arg))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:  # matplotlib is a dev dependency
        pass
    print()
    print(table(result))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
