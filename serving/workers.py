"""``--workers N``: N server processes sharing one port through SO_REUSEPORT.

For hosts where one Python process (the gRPC stack and protobuf work under one GIL) is the
bottleneck. The kernel spreads incoming connections across the workers, so the gain needs several
client connections. Metrics add up across workers: before any worker starts, the parent points
prometheus_client's multiprocess mode at a fresh directory (PROMETHEUS_MULTIPROC_DIR); every
worker writes its counters there, and both the parent's /metrics and each worker's ModelStatistics
read them through a MultiProcessCollector. SIGTERM/SIGINT to the parent is passed to every worker,
and each drains as a single server does. With --allow-shared-memory the workers also share their
shared-memory registrations, through a directory of their own (serving/shm.py).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from typing import Any

from cnnctl.errors import CnnctlError, UnavailableError
from cnnctl.serving.config import ServerConfig

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker (it then drains) when the parent dies, even of SIGKILL, which leaves
    it no chance to pass the signal on: orphaned workers would go on serving the port forever.
    Linux's PR_SET_PDEATHSIG; elsewhere the parent's own signal handling is all there is."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(config: ServerConfig, index: int, ready: Any, log_level: int, parent: int) -> None:
    _die_with_parent(parent)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    from cnnctl.serving.server import serve

    def started(line: str) -> None:
        ready.put((index, "ready", line))

    try:
        asyncio.run(serve(config, announce=False, on_started=started))
    except CnnctlError as exc:
        ready.put((index, "error", exc))
        raise SystemExit(2) from None


def _reserve_port(host: str) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: fixes port 0 to one number for every worker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def run_workers(config: ServerConfig) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="cnnctl-metrics-")
    # Must be set before prometheus_client is imported anywhere (it picks its value class then).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    reserved = _reserve_port(config.host) if config.port == 0 else None
    port = reserved.getsockname()[1] if reserved else config.port
    http_reserved = _reserve_port(config.host) if config.http_port == 0 else None
    http_port = http_reserved.getsockname()[1] if http_reserved else config.http_port
    threads = config.intra_op_threads or max(
        1, ((os.cpu_count() or 1) - config.workers) // (config.workers * config.instances))
    # A client's connections may reach different workers: they share shared-memory registrations.
    shm_dir = tempfile.mkdtemp(prefix="cnnctl-shm-") if config.allow_shared_memory else None
    worker_config = replace(config, port=port, http_port=http_port, workers=1, reuse_port=True,
                            metrics_port=None, intra_op_threads=threads, shm_dir=shm_dir)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_worker, args=(worker_config, i, ready, level, os.getpid()),
                         name=f"cnnctl-serve-{i}") for i in range(config.workers)]
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics_server = None
    try:
        for p in procs:
            p.start()
        started = 0
        end = time.monotonic() + START_TIMEOUT_S
        while started < len(procs) and not stop:
            try:
                index, kind, payload = ready.get(timeout=max(0.1, end - time.monotonic()))
            except Exception:  # noqa: BLE001 - queue.Empty: a worker hung or died silently
                raise UnavailableError(f"only {started} of {len(procs)} workers started within "
                                       f"{START_TIMEOUT_S:.0f} s") from None
            if kind == "error":
                raise payload
            started += 1
            if started == 1:
                print(payload, flush=True)
        if reserved is not None:
            reserved.close()
            reserved = None
        if http_reserved is not None:
            http_reserved.close()
            http_reserved = None
        if config.metrics_port is not None and not stop:
            from prometheus_client import start_http_server

            from cnnctl.serving.metrics import multiprocess_registry

            metrics_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host,
                                                  registry=multiprocess_registry(metrics_dir))
            print(f"metrics on http://{config.metrics_host}:{metrics_server.server_port}/metrics",
                  flush=True)
        if not stop:
            scheme = "grpcs" if config.tls_cert else "grpc"
            web = "" if http_port is None else (
                f" and {'https' if config.tls_cert else 'http'}://{config.host}:{http_port}")
            print(f"listening on {scheme}://{config.host}:{port}{web} ({config.workers} workers, "
                  f"{threads} intra-op threads each)", flush=True)
        for p in procs:
            while p.is_alive():
                p.join(0.2)
        codes = [p.exitcode for p in procs]
        if any(c not in (0, None) for c in codes):
            log.error("worker exit codes: %s", codes)
            return 1
        return 0
    finally:
        for p in procs:  # an error path: do not leave workers behind
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            if p.pid is not None:
                p.join(30)
        for s, handler in old.items():
            signal.signal(s, handler)
        if metrics_server is not None:
            metrics_server.shutdown()
        for sock in (reserved, http_reserved):
            if sock is not None:
                sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)
