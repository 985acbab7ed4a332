"""``cnnctl predict`` and ``cnnctl bench``.

cnnctl/cli.py imports this module only when one of them runs; with it comes the client (grpc,
numpy), never torch (tests/unit/test_imports.py checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cnnctl.clients.client import Client
from cnnctl.errors import UsageError

SERVER_HELP = ("Server address: HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS); several, "
               "comma-separated, or dns:///HOST:PORT: calls are balanced round robin.")


def _tls_options(f: Any) -> Any:
    f = click.option("--client-key", type=click.Path(dir_okay=False), default=None,
                     help="TLS: PEM private key of --client-cert.")(f)
    f = click.option("--client-cert", type=click.Path(dir_okay=False), default=None,
                     help="TLS: PEM client certificate, for servers that require one "
                     "(cnnctl serve --tls-client-ca; implies --tls).")(f)
    f = click.option("--server-name", default=None,
                     help="TLS: the name the server's certificate is for, if not the host.")(f)
    f = click.option("--root-certs", type=click.Path(dir_okay=False), default=None,
                     help="TLS: PEM file of root certificates to trust (implies --tls).")(f)
    f = click.option("--tls", is_flag=True, help="Connect over TLS (system roots unless "
                     "--root-certs).")(f)
    return f


def _expand_paths(paths: tuple[Path, ...]) -> list[Path]:
    from cnnctl.clients.images import list_images

    out: list[Path] = []
    for p in paths:
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


@click.command()
@click.option("--server", default="127.0.0.1:8001", show_default=True, help=SERVER_HELP)
@click.option("--model", required=True, help="Served model name.")
@click.option("--model-version", "version", default="", help="Model version (default: latest).")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--logits", is_flag=True, help="Include the raw logits (with --json).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Deadline for the whole call (s).")
@click.option("--preprocess", type=click.Choice(["server", "client"]), default="server",
              show_default=True, help="Send encoded images (server decodes) or float tensors.")
@_tls_options
def predict(server: str, model: str, version: str, images: tuple[Path, ...], top_k: int,
            as_json: bool, logits: bool, timeout: float, preprocess: str, tls: bool,
            root_certs: str | None, server_name: str | None, client_cert: str | None,
            client_key: str | None) -> None:
    """Classify IMAGE files (PNG/JPEG, or folders of them) on a running server."""
    paths = _expand_paths(images)
    with Client(server, timeout=timeout, tls=tls, root_certificates=root_certs,
                server_name=server_name, certificate_chain=client_cert, private_key=client_key,
                preprocess=preprocess) as client:
        results = client.predict(model, paths, top_k=top_k, return_logits=logits,
                                 version=version)
    if as_json:
        doc = {"server": server, "model": model,
               "predictions": [{"image": str(p), **r.to_json()} for p, r in zip(paths, results)]}
        click.echo(json.dumps(doc, indent=2))
        return
    width = max(len(str(p)) for p in paths)
    click.echo(f"{'IMAGE':<{width}}  {'LABEL':<12} {'PROB':>6}  TOP-{top_k}")
    for p, r in zip(paths, results):
        rest = ", ".join(f"{lb} {pr:.2f}" for lb, pr in zip(r.labels, r.probabilities))
        click.echo(f"{str(p):<{width}}  {r.label:<12} {r.probability:>6.3f}  {rest}")


def _levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """``--concurrency``: comma-separated levels, each checked by click.IntRange."""
    level = click.IntRange(1, 1024)
    levels = tuple(level.convert(v.strip(), param, ctx) for v in value.split(",") if v.strip())
    if not levels:
        raise click.BadParameter(f"{value!r} names no level; e.g. 1,8,64", ctx, param)
    return levels


@click.command()
@click.option("--server", default="127.0.0.1:8001", show_default=True, help=SERVER_HELP)
@click.option("--model", default=None, help="Served model name (needed unless --in-process only).")
@click.option("--model-version", "version", default="")
@click.option("--concurrency", callback=_levels, default="1,8,64", show_default=True,
              help="Requests in flight, one run per level (comma-separated).")
@click.option("--duration", type=click.FloatRange(min=0.1, max=600), default=5.0,
              show_default=True, help="Measured seconds per level.")
@click.option("--warmup", type=click.FloatRange(min=0, max=60), default=1.0, show_default=True,
              help="Unmeasured seconds before each level.")
@click.option("--batch", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Images per request.")
@click.option("--images", "images_dir", type=click.Path(file_okay=False), default=None,
              help="Send these images (encoded, cycled) instead of random FP32 tensors.")
@click.option("--preprocess", type=click.Choice(["server", "client"]), default="server",
              show_default=True, help="With --images: send them encoded (server decodes) or as "
              "client-side float tensors.")
@click.option("--max-requests", type=click.IntRange(min=1), default=1_000_000,
              show_default=True, help="Stop a level after this many requests, whatever the time.")
@click.option("--streaming", is_flag=True, help="Each client sends its requests over a "
              "ModelStreamInfer stream of its own instead of one call per request.")
@click.option("--in-process", "artifact_dir", type=click.Path(file_okay=False), default=None,
              help="Also time ONNX Runtime on this artifact's ONNX file in-process (the ceiling).")
@click.option("--grpc/--no-grpc", "use_grpc", default=True, show_default=True,
              help="Load the server (--no-grpc with --in-process: ceiling only).")
@click.option("--json", "as_json", is_flag=True, help="Results as JSON on stdout.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON results to this file.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write throughput/latency plots (PNG; needs matplotlib).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_tls_options
def bench(server: str, model: str | None, version: str, concurrency: tuple[int, ...],
          duration: float,
          warmup: float, batch: int, images_dir: str | None, preprocess: str,
          max_requests: int, streaming: bool,
          artifact_dir: str | None, use_grpc: bool, as_json: bool, out: str | None,
          plot: str | None, progress: bool, tls: bool, root_certs: str | None,
          server_name: str | None, client_cert: str | None, client_key: str | None) -> None:
    """Throughput and p50/p90/p99 latency of a running server at each concurrency level."""
    from cnnctl.clients import bench as b

    if use_grpc and not model:
        raise UsageError("--model is required to load a server (or --no-grpc --in-process DIR)")
    if not use_grpc and not artifact_dir:
        raise UsageError("--no-grpc measures nothing without --in-process ARTIFACT_DIR")
    config = b.BenchConfig(
        server=server, model=model or "", version=version, levels=concurrency,
        duration_s=duration, warmup_s=warmup, batch=batch, images_dir=images_dir,
        max_requests=max_requests, progress=progress and not as_json, tls=tls,
        root_certificates=root_certs, server_name=server_name, certificate_chain=client_cert,
        private_key=client_key, preprocess=preprocess,
        streaming=streaming)
    rows = b.run_grpc(config) if use_grpc else []
    if artifact_dir:
        rows += b.run_in_process(artifact_dir, config)
    doc = b.to_json(config, rows)
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    if plot:
        b.plot(rows, plot, title=f"{model or Path(artifact_dir or '').name} on {server}")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(b.table(rows))
        if plot:
            click.echo(f"plot: {plot}")


@click.command()
@click.option("--server", default="127.0.0.1:8001", show_default=True, help=SERVER_HELP)
@click.option("--service", default="", show_default=True,
              help="Health service name: '' the server is ready, 'live' the process runs (stays "
              "SERVING while draining), or a model name.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Deadline (s).")
@_tls_options
def health(server: str, service: str, timeout: float, tls: bool, root_certs: str | None,
           server_name: str | None, client_cert: str | None, client_key: str | None) -> None:
    """Check a server's gRPC health (for container health checks); exit 0 when SERVING.

    Prints the status (SERVING, NOT_SERVING, ...); exits 1 when it is not SERVING or the server
    cannot be reached, as container health checks expect.
    """
    from cnnctl.clients.errors import ClientError

    try:
        with Client(server, timeout=timeout, retries=0, tls=tls, root_certificates=root_certs,
                    server_name=server_name, certificate_chain=client_cert,
                    private_key=client_key) as client:
            status = client.health(service)
    except ClientError as exc:
        if exc.code.name == "NOT_FOUND":
            click.echo(f"{server}: NOT_FOUND: no health service {service!r} (cnnctl serve "
                       f"answers '', 'live' and each model's name)", err=True)
        else:
            click.echo(f"{server}: {exc.code.name}: {exc.message}", err=True)
        raise SystemExit(1) from None
    click.echo(status)
    if status != "SERVING":
        raise SystemExit(1)


@click.command()
@click.option("--server", required=True, help=SERVER_HELP)
@click.argument("artifact_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default=None, help="Served model name [default: the artifact's].")
@click.option("--model-version", "version", default="", help="Model version (default: the "
              "server's latest).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Tolerance to judge by [default: the precision the server says it serves "
              "(cnnctl serve), else fp32].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Deadline for each call (s).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_tls_options
def verify(server: str, artifact_dir: Path, model: str | None, version: str,
           precision: str | None, timeout: float, as_json: bool, tls: bool,
           root_certs: str | None, server_name: str | None, client_cert: str | None,
           client_key: str | None) -> None:
    """Check that a KServe v2 server answers ARTIFACT_DIR's golden set as the artifact does.

    Works against any KServe v2 gRPC server (cnnctl serve, Triton serving the artifact's
    --triton layout): the golden images are preprocessed here and sent as tensors. Exits 2 naming
    the mismatch when the answers, shapes or preprocessing differ.
    """
    from cnnctl.clients.verify import raise_on_mismatch, verify_server

    check = verify_server(server, artifact_dir, model=model, version=version,
                          precision=precision, timeout=timeout, retries=1, tls=tls,
                          root_certificates=root_certs, server_name=server_name,
                          certificate_chain=client_cert, private_key=client_key)
    if as_json:
        click.echo(json.dumps(check.to_json()))
        if not check.passed:
            raise SystemExit(2)
        return
    raise_on_mismatch(check)
    click.echo(check.line())
