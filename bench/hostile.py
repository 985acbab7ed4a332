"""Good clients beside hostile ones, against `cnnctl serve` with its default flags (lenet5).

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/hostile.py [--baseline-s 40] \\
        [--hostile-s 130]

Phase 1, good clients alone: closed loops of batch-1 tensor requests and of PNG requests, every
answer checked against in-process ONNX Runtime. Phase 2, the same good clients while a hostile
process sends, round robin, one request every ``--every-s`` of each kind docs/security.md names
(pixel bombs, broken and foreign image formats, millions of empty BYTES elements, more images than
the max batch size, messages over the size limit or that do not parse, hostile model names, wrong
tensors, expired deadlines, shared memory while it is off) and holds connections open: idle ones,
half-open ones that never finish the HTTP/2 handshake, a stream that sends and never reads, a
client pinging every 10 ms. Checked: every good answer right; every hostile request refused with
its expected code within 1 s; the server's peak resident memory; good p99 against phase 1's; no
traceback in the server's log. Writes bench/results/hostile.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import multiprocessing as mp
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # bench/ is not a package
sys.path.insert(0, str(ROOT))  # tests.support

from serve_speed import git_revision  # noqa: E402

RESULTS = BENCH / "results" / "hostile.json"
LIMIT_S = 1.0  # a hostile request must be refused within this long
SERVICE = "/inference.GRPCInferenceService/"


# ---------------------------------------------------------------- the server
class Server:
    def __init__(self, artifact: Path, log: Path) -> None:
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cnnctl", "serve", str(artifact), "--port", "0"],
            stdout=self._out, stderr=subprocess.STDOUT, cwd=artifact.parent)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            found = re.search(r"listening on grpc://([\d.]+):(\d+)", log.read_text())
            if found:
                self.address = f"{found.group(1)}:{found.group(2)}"
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{log.read_text()}")

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._out.close()


class RssSampler:
    """The server's resident memory every 50 ms: the peak of each phase."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak = server, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.server.rss_mb())

    def reset(self) -> float:
        peak, self.peak = self.peak, 0.0
        return peak

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---------------------------------------------------------------- good clients
def _png(pixels: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def good_clients(address: str, artifact: str, seconds: float, tensors: int, images: int,
                 out: Any) -> None:
    """Closed loops (``tensors`` + ``images`` callers), each answer compared with ONNX Runtime."""
    import grpc
    import numpy as np
    import onnxruntime as ort

    from cnnctl.export.image import to_tensor
    from cnnctl.export.manifest import load_manifest
    from cnnctl.protos import grpc_service_pb2 as pb

    manifest = load_manifest(artifact)
    session = ort.InferenceSession(str(Path(artifact) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cases: dict[str, list[tuple[bytes, Any]]] = {"tensor": [], "png": []}
    for _ in range(16):
        x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
        req = pb.ModelInferRequest(model_name="lenet5")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
        req.raw_input_contents.append(x.tobytes())
        cases["tensor"].append((req.SerializeToString(), session.run(None, {"input": x})[0]))
        png = _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
        req = pb.ModelInferRequest(model_name="lenet5")
        req.inputs.add(name="input", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(png)) + png)
        expected = session.run(None, {"input": to_tensor([png], manifest.image)})[0]
        cases["png"].append((req.SerializeToString(), expected))
    result: dict[str, Any] = {k: {"latencies_ms": [], "wrong": 0, "errors": {}} for k in cases}

    async def caller(kind: str, channel: Any, end: float, offset: int) -> None:
        infer = channel.unary_unary(SERVICE + "ModelInfer",
                                    response_deserializer=pb.ModelInferResponse.FromString)
        record = result[kind]
        i = offset
        while time.monotonic() < end:
            request, expected = cases[kind][i % 16]
            i += 1
            start = time.perf_counter()
            try:
                resp = await infer(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name
                record["errors"][name] = record["errors"].get(name, 0) + 1
                continue
            record["latencies_ms"].append((time.perf_counter() - start) * 1000)
            got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 10)
            if not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
                record["wrong"] += 1

    async def main() -> None:
        channel = grpc.aio.insecure_channel(address)
        end = time.monotonic() + seconds
        await asyncio.gather(*[caller("tensor", channel, end, i) for i in range(tensors)],
                             *[caller("png", channel, end, i) for i in range(images)])
        await channel.close()

    asyncio.run(main())
    out.send(result)


# ---------------------------------------------------------------- hostile clients
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_of_zeros(width: int, height: int, color: int) -> bytes:
    """A real, complete PNG of black pixels: tiny on the wire, huge decoded."""
    channels = 3 if color == 2 else 1
    row = b"\0" * (1 + width * channels)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def hostile_requests() -> dict[str, tuple[str, bytes, str]]:
    """name -> (method, serialized request, expected status code)."""
    import numpy as np
    from PIL import Image

    from cnnctl.protos import grpc_service_pb2 as pb

    def images(items: list[bytes], shape: list[int] | None = None,
               timeout_us: int | None = None) -> bytes:
        req = pb.ModelInferRequest(model_name="lenet5")
        req.inputs.add(name="input", datatype="BYTES", shape=shape or [len(items)])
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
        if timeout_us is not None:
            req.parameters["timeout"].int64_param = timeout_us
        return req.SerializeToString()

    def tensor(shape: list[int], datatype: str = "FP32", nbytes: int | None = None,
               model: str = "lenet5") -> bytes:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype=datatype, shape=shape)
        size = nbytes if nbytes is not None else 4 * int(np.prod(shape))
        req.raw_input_contents.append(b"\0" * size)
        return req.SerializeToString()

    good_png = _png(np.full((28, 28), 128, np.uint8))
    sixteen = io.BytesIO()
    Image.fromarray((np.arange(784).reshape(28, 28) * 83).astype(np.uint16)).save(sixteen, "PNG")
    broken16 = bytearray(sixteen.getvalue())
    broken16[broken16.index(b"IDAT") - 1] = 0
    gif = io.BytesIO()
    Image.new("L", (28, 28)).save(gif, format="GIF")
    register = pb.SystemSharedMemoryRegisterRequest(name="r", key="/cnnctl_bench", byte_size=64)
    empty = pb.ModelInferRequest(model_name="lenet5")
    empty.inputs.add(name="input", datatype="BYTES", shape=[1])
    empty.raw_input_contents.append(b"\0\0\0\0" * 2_000_000)  # 7.6 MiB, 2 million elements
    bad, full, late = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"
    infer = "ModelInfer"
    return {
        "png 13000x13000 RGB, 0.5 MB": (infer, images([_png_of_zeros(13000, 13000, 2)]), bad),
        "png 9000x9000 gray, 79 KB": (infer, images([_png_of_zeros(9000, 9000, 0)]), bad),
        "png header claiming 20000x20000": (infer, images([good_png, _png_header(20000, 20000)]),
                                            bad),
        "16-bit png, broken chunk": (infer, images([good_png, bytes(broken16)]), bad),
        "gif": (infer, images([gif.getvalue()]), bad),
        "2M empty BYTES elements": (infer, empty.SerializeToString(), bad),
        "16000 images in one request": (infer, images([good_png] * 16000), bad),
        "tensor batch of 1000": (infer, tensor([1000, 1, 32, 32]), bad),
        "image past its deadline": (infer, images([good_png], timeout_us=1), late),
        "message over 64 MiB": (infer, tensor([1, 1, 32, 32], nbytes=65 << 20), full),
        "message that does not parse": (infer, b"\xff\xff\xff\xff\x0f garbage", bad),
        "100 KB model name with newlines": (infer, tensor([1, 1, 32, 32],
                                                          model="a\nb" * 50_000), "NOT_FOUND"),
        "INT64 tensor": (infer, tensor([1, 1, 32, 32], "INT64", 8 * 1024), bad),
        "raw contents of the wrong length": (infer, tensor([1, 1, 32, 32], nbytes=17), bad),
        "shared memory while off": ("SystemSharedMemoryRegister", register.SerializeToString(),
                                    "FAILED_PRECONDITION"),
    }


async def _half_open(address: str, count: int, seconds: float) -> dict[str, int]:
    """Connections that send half of HTTP/2's preface and then nothing: how many the server has
    closed by the end (its handshake timeout; it sends its SETTINGS frame first)."""
    host, port = address.rsplit(":", 1)
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"PRI * HTTP/2.0\r\n")
        s.setblocking(False)
        socks.append(s)
    await asyncio.sleep(seconds)
    closed = 0
    for s in socks:
        try:
            while s.recv(1 << 16):
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return {"opened": count, "closed_by_server": closed}


async def _never_reads(address: str, seconds: float, count: int = 2000) -> dict[str, int]:
    """A stream that sends ``count`` batch-1 requests as fast as it may and never reads an
    answer. (Sending without end would be a flood of valid requests, which the server computes
    like any client's: docs/security.md.)"""
    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="lenet5")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    req.raw_input_contents.append(b"\0" * 4096)
    data = req.SerializeToString()
    channel = grpc.aio.insecure_channel(address)
    call = channel.stream_stream(SERVICE + "ModelStreamInfer")()
    sent = 0

    async def send() -> None:
        nonlocal sent
        while sent < count:
            await call.write(data)
            sent += 1

    task = asyncio.ensure_future(send())
    await asyncio.sleep(seconds)
    task.cancel()
    call.cancel()
    await channel.close()
    return {"requests_sent": sent}


async def _idle(address: str, count: int, seconds: float) -> dict[str, int]:
    import grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(count)]
    for ch in channels:
        await ch.unary_unary(SERVICE + "ServerLive")(b"")
    await asyncio.sleep(seconds)
    for ch in channels:
        await ch.close()
    return {"connections": count}


async def _pinger(address: str, seconds: float) -> dict[str, int]:
    """A client pinging every 10 ms, calling once a second."""
    import grpc

    options = [("grpc.keepalive_time_ms", 10), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    channel = grpc.aio.insecure_channel(address, options=options)
    codes: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            await channel.unary_unary(SERVICE + "ServerLive")(b"", timeout=5)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1
        await asyncio.sleep(1)
    await channel.close()
    return codes


def hostile_clients(address: str, seconds: float, every_s: float, out: Any) -> None:
    import grpc

    requests = hostile_requests()
    names = list(requests)
    results: dict[str, dict[str, Any]] = {n: {"codes": {}, "latencies_ms": []} for n in names}

    async def one(name: str, channel: Any) -> None:
        method, data, _ = requests[name]
        call = channel.unary_unary(SERVICE + method)
        start = time.perf_counter()
        try:
            await call(data, timeout=10)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        record = results[name]
        record["latencies_ms"].append((time.perf_counter() - start) * 1000)
        record["codes"][code] = record["codes"].get(code, 0) + 1

    async def main() -> dict[str, Any]:
        options = [("grpc.max_send_message_length", 128 << 20)]
        channel = grpc.aio.insecure_channel(address, options=options)
        held = asyncio.gather(_half_open(address, 100, seconds), _never_reads(address, seconds),
                              _idle(address, 200, seconds), _pinger(address, seconds))
        end = time.monotonic() + seconds
        tasks = set()
        i = 0
        while time.monotonic() < end:
            task = asyncio.ensure_future(one(names[i % len(names)], channel))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(every_s)
        await asyncio.gather(*tasks)
        half_open, never_reads, idle, pinger = await held
        await channel.close()
        return {"half_open": half_open, "never_reads": never_reads, "idle": idle,
                "pinger_codes": pinger}

    held = asyncio.run(main())
    out.send({"requests": results, "expected": {n: requests[n][2] for n in names}, **held})


# ---------------------------------------------------------------- the run
def _phase(server: Server, artifact: Path, seconds: float, tensors: int, images: int,
           hostile_every_s: float | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    ctx = mp.get_context("spawn")
    good_out, good_in = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=good_clients, args=(server.address, str(artifact), seconds,
                                                    tensors, images, good_in))]
    hostile_out = None
    if hostile_every_s is not None:
        hostile_out, hostile_in = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=hostile_clients,
                                 args=(server.address, seconds, hostile_every_s, hostile_in)))
    for p in procs:
        p.start()
    good = good_out.recv()
    hostile = hostile_out.recv() if hostile_out is not None else None
    for p in procs:
        p.join(60)
    return good, hostile


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _good_summary(good: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {kind: {"answers": len(r["latencies_ms"]), "wrong": r["wrong"], "errors": r["errors"],
                   "req_per_s": len(r["latencies_ms"]) / seconds,
                   "p50_ms": _pct(r["latencies_ms"], 0.5), "p99_ms": _pct(r["latencies_ms"], 0.99)}
            for kind, r in good.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-s", type=float, default=40.0)
    parser.add_argument("--hostile-s", type=float, default=130.0)
    parser.add_argument("--every-s", type=float, default=0.2,
                        help="one hostile request this often, the kinds in turn")
    parser.add_argument("--tensor-clients", type=int, default=4)
    parser.add_argument("--image-clients", type=int, default=2)
    args = parser.parse_args()
    from tests.support.serving import make_artifact

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    artifact = make_artifact(work / "lenet5")
    server = Server(artifact, work / "server.log")
    sampler = RssSampler(server)
    try:
        rss_start = server.rss_mb()
        print(f"phase 1: good clients alone, {args.baseline_s:.0f} s", flush=True)
        base, _ = _phase(server, artifact, args.baseline_s, args.tensor_clients,
                         args.image_clients, None)
        rss_base = sampler.reset()
        print(f"phase 2: good and hostile clients, {args.hostile_s:.0f} s", flush=True)
        mixed, hostile = _phase(server, artifact, args.hostile_s, args.tensor_clients,
                                args.image_clients, args.every_s)
        rss_mixed = sampler.reset()
        assert hostile is not None
        alive = server.proc.poll() is None
    finally:
        sampler.stop()
        server.stop()
    log = server.log.read_text()
    kinds = {}
    for name, record in hostile["requests"].items():
        expected = hostile["expected"][name]
        kinds[name] = {"expected": expected, "codes": record["codes"],
                       "count": len(record["latencies_ms"]),
                       "max_ms": max(record["latencies_ms"], default=float("nan")),
                       "p50_ms": _pct(record["latencies_ms"], 0.5),
                       "ok": set(record["codes"]) == {expected}
                       and max(record["latencies_ms"], default=0) < LIMIT_S * 1000}
    good_base = _good_summary(base, args.baseline_s)
    good_mixed = _good_summary(mixed, args.hostile_s)
    result = {
        "bench": "hostile", "started": started, "commit": git_revision(ROOT),
        "machine": f"{os.cpu_count()} cores", "args": vars(args),
        "server_alive_after": alive,
        "rss_mb": {"start": rss_start, "peak_good_only": rss_base, "peak_with_hostile": rss_mixed},
        "good_only": good_base, "good_with_hostile": good_mixed,
        "p99_ratio": {k: good_mixed[k]["p99_ms"] / good_base[k]["p99_ms"] for k in good_base},
        "hostile": kinds, "held": {k: hostile[k] for k in ("half_open", "never_reads", "idle",
                                                           "pinger_codes")},
        "server_log": {"lines": len(log.splitlines()), "tracebacks": log.count("Traceback")},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nserver alive after: {alive}; log lines {result['server_log']['lines']}, "
          f"tracebacks {result['server_log']['tracebacks']}")
    print(f"server RSS MB: start {rss_start:.0f}, peak good only {rss_base:.0f}, peak with "
          f"hostile {rss_mixed:.0f}")
    print("\n| good clients | answers | wrong | errors | p50 ms | p99 ms alone | p99 ms with "
          "hostile | ratio |\n|---|---|---|---|---|---|---|---|")
    for k in good_base:
        m = good_mixed[k]
        print(f"| {k} | {m['answers']} | {m['wrong'] + good_base[k]['wrong']} | "
              f"{m['errors'] or ''} | {m['p50_ms']:.2f} | {good_base[k]['p99_ms']:.2f} | "
              f"{m['p99_ms']:.2f} | {result['p99_ratio'][k]:.2f} |")
    print("\n| hostile request | sent | answered | expected | max ms | ok |\n"
          "|---|---|---|---|---|---|")
    for name, k in kinds.items():
        codes = ", ".join(f"{c} {n}" for c, n in k["codes"].items())
        print(f"| {name} | {k['count']} | {codes} | {k['expected']} | {k['max_ms']:.0f} | "
              f"{'yes' if k['ok'] else 'NO'} |")
    print(f"\nheld: {json.dumps(result['held'])}")


if __name__ == "__main__":
    main()
