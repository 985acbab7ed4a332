"""REST batch-1 lenet5: `cnnctl serve`'s HTTP endpoint vs a do-nothing aiohttp server (the ceiling
of the HTTP library it runs on) and vs Seldon MLServer's REST on the same ONNX file with its
adaptive batching, side by side in one run.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/serve_rest.py [--mlserver PYTHON]

Load: wrk (apt-get install wrk), closed loop, C connections each sending the next request when the
answer arrives, one client thread; the same JSON request body (the protocol's plain form, which all
take: MLServer has no binary extension) to every server, then the same tensor with Triton's binary
data extension to all but MLServer; rounds interleaved so that drift in the machine's load hits all
alike. Then perf_analyzer -i http (binary data, its default) against cnnctl and the two aiohttp
servers, closed loop and open loop (Poisson arrivals). The aiohttp servers use its low-level
``web.Server``, as cnnctl does: the cheapest way to answer on that library.

MLServer runs from a venv of its own (--mlserver: its python; `python -m venv /work/mlserver-venv &&
/work/mlserver-venv/bin/pip install mlserver==1.7.1 onnxruntime 'uvloop<0.22'`: MLServer 1.7.1
fails to start its workers on uvloop 0.22+), so its pins never touch cnnctl's. It ships no ONNX
runtime; bench/mlserver/onnx_runtime.py is the custom runtime its docs describe. Writes
bench/results/serve_rest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
sys.path.append(str(ROOT / "bench"))

from tests.support.serving import CliServer, make_artifact  # noqa: E402

MODEL = "lenet5"
BINARY = "application/octet-stream"
SHAPE = [1, 1, 32, 32]
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BODY"), "rb"); wrk.body = f:read("*a"); f:close()
"""


# -- the ceiling: aiohttp with nothing to do
def ceiling(port: int, onnx: str | None = None) -> None:
    """Answers every route perf_analyzer and wrk call with canned bytes: reads the request body,
    returns an answer the size of cnnctl's, and does nothing else. With ``onnx`` (the bare ORT
    server) it also takes the tensor from the body (orjson, or the binary part), runs a 1-thread
    ORT session on the event loop and answers with the logits: the most any Python server that
    runs the model per request on aiohttp could reach (no checks, batching or metrics)."""
    import numpy as np
    import orjson
    from aiohttp import web

    logits = [0.0123456789] * 10
    json_answer = json.dumps({"model_name": MODEL, "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": logits}]}).encode()
    header = json.dumps({"model_name": MODEL, "model_version": "1", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [1, 10],
         "parameters": {"binary_data_size": 40}}]}).encode()
    binary_answer = header + bytes(40)
    metadata = {"name": MODEL, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
    config = {"name": MODEL, "platform": "onnxruntime_onnx", "max_batch_size": 64,
              "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 32, 32]}],
              "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]}

    session = None
    if onnx:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])

    async def infer(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        length = request.headers.get("Inference-Header-Content-Length")
        if session is not None:
            if length is None:
                x = np.array(orjson.loads(body)["inputs"][0]["data"], np.float32)
            else:
                x = np.frombuffer(body, np.float32, offset=int(length))
            y = session.run(None, {"input": x.reshape(SHAPE)})[0]
            if length is None:
                return web.Response(body=orjson.dumps({
                    "model_name": MODEL, "model_version": "1", "outputs": [
                        {"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": y[0]}]},
                    option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")
            return web.Response(body=header + y.tobytes(), content_type=BINARY,
                                headers={"Inference-Header-Content-Length": str(len(header))})
        if length is not None:
            return web.Response(body=binary_answer, content_type=BINARY,
                                headers={"Inference-Header-Content-Length": str(len(header))})
        return web.Response(body=json_answer, content_type="application/json")

    async def fixed(request: web.BaseRequest) -> web.Response:
        if request.path == "/v2":
            return web.json_response({"name": "ceiling", "version": "0", "extensions": []})
        doc = {"/config": config, "/stats": {"model_stats": []}}.get(
            request.path[len(f"/v2/models/{MODEL}"):], metadata)
        return web.json_response(doc)

    async def ok(request: web.BaseRequest) -> web.Response:
        return web.Response()

    async def handle(request: web.BaseRequest) -> web.Response:
        # aiohttp's low-level server, as cnnctl's (serving/http.py): the cheapest way to answer
        # on this library, so that the ceiling is one
        if request.method == "POST":
            return await infer(request)
        if request.path == "/v2/health/ready":
            return await ok(request)
        return await fixed(request)

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


# -- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen[Any], path: str, timeout: float = 120.0) -> None:
    import http.client

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server on {port} not ready after {timeout:.0f} s")


def start_ceiling(onnx: Path | None = None) -> tuple[subprocess.Popen[Any], int]:
    port = free_port()
    extra = ["--onnx", str(onnx)] if onnx else []
    proc = subprocess.Popen([sys.executable, __file__, "ceiling", "--port", str(port), *extra])
    wait_ready(port, proc, "/v2/health/ready")
    return proc, port


def start_mlserver(python: str, onnx: Path, work: Path, batch: int,
                   batch_time_s: float, workers: int) -> tuple[subprocess.Popen[Any], int]:
    port = free_port()
    model = work / MODEL
    model.mkdir(parents=True)
    shutil.copy(onnx, model / "model.onnx")
    shutil.copy(ROOT / "bench/mlserver/onnx_runtime.py", model / "onnx_runtime.py")
    (work / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": workers, "debug": False}))
    (model / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "onnx_runtime.OnnxModel",
        "parameters": {"uri": "./model.onnx"},
        "max_batch_size": batch, "max_batch_time": batch_time_s}))
    log = (work / "mlserver.log").open("w")
    proc = subprocess.Popen([str(Path(python).parent / "mlserver"), "start", str(work)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work)
    wait_ready(port, proc, f"/v2/models/{MODEL}/ready")
    return proc, port


# -- load
def wrk(port: int, concurrency: int, seconds: int, body: Path, lua: Path) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(lua),
           f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                          env={**os.environ, "BODY": str(body)})
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done.returncode != 0 or not rate:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{out}\n{done.stderr}")

    def ms(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return {"images_per_s": float(rate.group(1)), "p50_ms": ms("50"), "p90_ms": ms("90"),
            "p99_ms": ms("99"), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def perf_analyzer(exe: str, env: dict[str, str], port: int, concurrency: int | None,
                  rate: float | None, window_ms: int) -> dict[str, Any] | None:
    load = (["--request-rate-range", f"{rate}:{rate}", "--request-distribution", "poisson"]
            if rate else ["--concurrency-range", f"{concurrency}:{concurrency}"])
    cmd = [exe, "-m", MODEL, "-u", f"127.0.0.1:{port}", "-i", "http", "-b", "1", *load,
           "--measurement-interval", str(window_ms), "--max-trials", "6",
           "--stability-percentage", "50"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = done.stdout
    found = re.search(r"Throughput: ([\d.]+) infer/sec", out)
    if not found:
        if "Failed to obtain stable measurement" in out + done.stderr:
            if window_ms < 8000:  # longer windows
                return perf_analyzer(exe, env, port, concurrency, rate, window_ms * 2)
            return None
        raise RuntimeError(f"perf_analyzer gave no result ({done.returncode}):\n{out}\n"
                           f"{done.stderr}")

    def usec(name: str) -> float:
        m = re.search(rf"{name} latency: (\d+) usec", out)
        return int(m.group(1)) / 1e3 if m else float("nan")

    return {"images_per_s": float(found.group(1)), "p50_ms": usec("p50"),
            "p99_ms": usec("p99"), "rc": done.returncode}


def json_body(path: Path) -> Path:
    import numpy as np

    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    path.write_text(json.dumps({"inputs": [{"name": "input", "shape": SHAPE, "datatype": "FP32",
                                            "data": x.ravel().tolist()}]}))
    return path


def binary_body(path: Path) -> tuple[Path, int]:
    """The same tensor with Triton's binary data extension (as tritonclient.http sends it with
    binary_data=True): (file, JSON header length)."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": SHAPE, "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits",
                                      "parameters": {"binary_data": True}}]}).encode()
    path.write_bytes(header + x.tobytes())
    return path, len(header)


def _code_of(python: str) -> dict[str, str]:
    """Which checkout (and commit) a python's cnnctl comes from."""
    where = subprocess.run([python, "-c", "import cnnctl, os; print(os.path.dirname(cnnctl."
                            "__file__))"], capture_output=True, text=True, cwd="/").stdout.strip()
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(where).parent).stdout.strip() if where else ""
    return {"python": python, "package": where, "code": code}


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    out = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["runs"] = runs
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("ceiling", help="run only the do-nothing aiohttp server")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--onnx", default=None, help="the bare ORT server: run this model")
    parser.add_argument("--artifact", default=None, help="lenet5 artifact dir (default: a "
                        "random-weight one; the speed does not depend on the weights)")
    parser.add_argument("--mlserver", default="/work/mlserver-venv/bin/python",
                        help="the python of a venv with mlserver and onnxruntime")
    parser.add_argument("--mlserver-workers", type=int, default=1,
                        help="MLServer parallel_workers (its default is 1)")
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rates", default="300", help="perf_analyzer open-loop rates (req/s)")
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--pa-rounds", type=int, default=2,
                        help="perf_analyzer measurements per load and server, interleaved")
    parser.add_argument("--baseline", default=None, metavar="PYTHON",
                        help="also run `cnnctl serve` from this python (another checkout's "
                             "venv: the code before a change) in every load, as cnnctl_baseline")
    parser.add_argument("--out", default=str(ROOT / "bench/results/serve_rest.json"))
    args = parser.parse_args()
    if args.command == "ceiling":
        ceiling(args.port, args.onnx)
        return 0
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 1
    levels = [int(v) for v in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-rest-"))
    artifact = Path(args.artifact) if args.artifact else make_artifact(work / "art", MODEL)
    body = json_body(work / "request.json")
    lua = work / "post.lua"
    lua.write_text(WRK_LUA)
    procs: list[subprocess.Popen[Any]] = []
    cnnctl = baseline = None
    try:
        cnnctl = CliServer(str(artifact), "--device", "cpu")
        ceiling_proc, ceiling_port = start_ceiling()
        procs.append(ceiling_proc)
        bare_proc, bare_port = start_ceiling(artifact / "model.onnx")
        procs.append(bare_proc)
        ml_proc, ml_port = start_mlserver(args.mlserver, artifact / "model.onnx",
                                          work / "mlserver", 64, 0.002, args.mlserver_workers)
        procs.append(ml_proc)
        ports = {"cnnctl": cnnctl.http_port, "aiohttp_ceiling": ceiling_port,
                 "aiohttp_bare_ort": bare_port, "mlserver": ml_port}
        if args.baseline:
            # cwd: not a checkout, whose cnnctl/ would shadow the baseline's
            baseline = CliServer(str(artifact), "--device", "cpu", python=args.baseline, cwd="/")
            ports["cnnctl_baseline"] = baseline.http_port
        for port in ports.values():  # warm up: sessions, connections, allocators
            wrk(port, 8, 2, body, lua)
        results: dict[str, Any] = {"wrk_json": {}, "wrk_binary": {}, "perf_analyzer_binary": {}}
        bin_body, bin_length = binary_body(work / "request.bin")
        bin_lua = work / "post_binary.lua"
        bin_lua.write_text(WRK_LUA.replace(
            'wrk.headers["Content-Type"] = "application/json"',
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
            f'wrk.headers["Inference-Header-Content-Length"] = "{bin_length}"'))
        # MLServer has no binary extension: JSON only
        kinds = [("json", body, lua, ports),
                 ("binary", bin_body, bin_lua, {k: v for k, v in ports.items() if k != "mlserver"})]
        for kind, kind_body, kind_lua, kind_ports in kinds:
            for c in levels:
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in kind_ports}
                for _ in range(args.rounds):
                    for name, port in kind_ports.items():
                        runs[name].append(wrk(port, c, args.seconds, kind_body, kind_lua))
                row = {name: median_runs(r) for name, r in runs.items()}
                cn = row["cnnctl"]["images_per_s"]
                for other, key in (("aiohttp_ceiling", "ceiling"), ("aiohttp_bare_ort", "bare_ort"),
                                   ("mlserver", "mlserver"), ("cnnctl_baseline", "baseline")):
                    if other in row:
                        row[f"cnnctl_vs_{key}"] = round(cn / row[other]["images_per_s"], 3)
                results[f"wrk_{kind}"][f"c{c}"] = row
                print(f"wrk {kind} c{c}: " + ", ".join(
                    f"{n} {row[n]['images_per_s']:.0f}/s p99 {row[n]['p99_ms']:.1f} ms"
                    for n in kind_ports), f"-> {row['cnnctl_vs_ceiling']}x ceiling", flush=True)
        try:
            import perf_analyzer as pa

            exe, env = pa.find(fetch_if_missing=True), pa.env()
        except Exception as exc:  # noqa: BLE001 - PerfAnalyzerMissing, or pip failing
            print(f"perf_analyzer part skipped: {exc}", file=sys.stderr)
            exe = None
        if exe:
            pa_ports = {k: v for k, v in ports.items() if k != "mlserver"}
            loads = [(f"c{c}", c, None) for c in levels] + [
                (f"poisson{r}", None, float(r)) for r in args.rates.split(",") if r]
            for label, conc, rate in loads:
                measured: dict[str, list[dict[str, Any]]] = {name: [] for name in pa_ports}
                for _ in range(args.pa_rounds):
                    for name, port in pa_ports.items():
                        one = perf_analyzer(exe, env, port, conc, rate, args.window_ms)
                        if one is not None:
                            measured[name].append(one)
                row = {name: median_runs(r) if r else None for name, r in measured.items()}
                if all(row.values()):
                    for ref, key in (("aiohttp_ceiling", "ceiling"), ("aiohttp_bare_ort", "bare_ort"),
                                     ("cnnctl_baseline", "baseline")):
                        if ref in row:
                            row[f"cnnctl_vs_{key}"] = round(
                                row["cnnctl"]["images_per_s"] / row[ref]["images_per_s"], 3)
                results["perf_analyzer_binary"][label] = row
                print(f"perf_analyzer {label}: " + ", ".join(
                    f"{n} {v['images_per_s']:.0f}/s p99 {v['p99_ms']:.1f} ms"
                    for n, v in row.items() if isinstance(v, dict)), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in (cnnctl, baseline):
            if server is not None:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)
    mlserver_version = subprocess.run([args.mlserver, "-c", "import mlserver; print("
                                       "mlserver.__version__)"], capture_output=True,
                                      text=True).stdout.strip()
    import aiohttp

    doc = {
        "script": "bench/serve_rest.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "setup": {"model": "lenet5 (random weights), batch 1, FP32 [1, 1, 32, 32]",
                  "cnnctl": "cnnctl serve --device cpu (defaults: dynamic batching, "
                            "max batch 64)",
                  "aiohttp_ceiling": f"aiohttp {aiohttp.__version__} low-level web.Server, "
                                     f"reads the body, answers canned bytes of the same size",
                  "aiohttp_bare_ort": "aiohttp, takes the tensor from the body, 1-thread ORT "
                                      "on the loop, answers the logits; no checks, batching or "
                                      "metrics",
                  "mlserver": f"MLServer {mlserver_version}, bench/mlserver/onnx_runtime.py, "
                              f"adaptive batching max_batch_size 64, max_batch_time 2 ms, "
                              f"parallel_workers {args.mlserver_workers}",
                  "wrk": f"wrk -t1 -cC -d{args.seconds}s, JSON body, then binary (header + "
                         f"4096 bytes, binary output), median of {args.rounds} interleaved "
                         f"rounds",
                  "perf_analyzer": f"-i http (binary inputs), closed loop -cC and open loop "
                                   f"Poisson, against cnnctl and the two aiohttp servers; "
                                   f"median of {args.pa_rounds} interleaved"},
        "baseline": None if not args.baseline else _code_of(args.baseline),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
