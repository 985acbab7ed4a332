"""Regenerate the Python stubs from the .proto files: ``python -m cnnctl.protos.generate``.

The protos are compiled under the virtual path ``cnnctl/protos/`` so that the generated modules
import each other as ``cnnctl.protos.xxx_pb2`` and register themselves in protobuf's descriptor pool
as ``cnnctl/protos/*.proto``. tests/unit/serving/test_protos.py regenerates into a temporary
directory and checks the committed stubs are identical.

The message full names are Triton's (``inference.ModelInferRequest``...), as the protocol needs.
So that ``tritonclient.grpc`` (which registers the same names in protobuf's default pool) can be
imported in the same process, the stubs register into cnnctl's own pool, ``cnnctl.protos.POOL``:
the one edit made to protoc's output (``_descriptor_pool.Default()`` becomes that pool).

The stubs are generated with the oldest grpcio-tools whose output the declared ranges promise to
run on (``GRPCIO_TOOLS``): protobuf runs gencode of its own version or older, and the generated
``_pb2_grpc`` modules need grpcio at least as new as the grpcio-tools that wrote them.
pyproject.toml's ``protobuf`` and ``grpcio`` lower bounds match (tests/unit/test_packaging.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
VIRTUAL_DIR = "cnnctl/protos"
GRPCIO_TOOLS = "1.64.3"  # writes protobuf 5.26.1 gencode; pyproject: protobuf>=5.26.1, grpcio>=1.64.3
DEFAULT_POOL = "_descriptor_pool.Default()"
OWN_POOL = "_descriptor_pool_own.POOL"
POOL_IMPORT = "from cnnctl import protos as _descriptor_pool_own\n"
# The oldest runtimes pyproject.toml allows, with the tools: what tools_python() installs.
LOWEST = (f"grpcio-tools=={GRPCIO_TOOLS}", f"grpcio=={GRPCIO_TOOLS}", "protobuf==5.26.1",
          f"grpcio-health-checking=={GRPCIO_TOOLS}", f"grpcio-reflection=={GRPCIO_TOOLS}")


def generated_names() -> list[str]:
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def tools_python(cache: Path | None = None) -> Path:
    """A Python with grpcio-tools ``GRPCIO_TOOLS`` and the lowest runtimes we declare: a venv made
    once under ``cache`` (default ``~/.cache/cnnctl``) with pip, from the package index."""
    import os
    import subprocess
    import venv

    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnctl"
    env_dir = cache / f"protoc-{GRPCIO_TOOLS}"
    python = env_dir / "bin" / "python"
    done = env_dir / "ready"
    if not done.exists():
        venv.create(env_dir, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--only-binary", ":all:", *LOWEST], check=True)
        done.write_text(" ".join(LOWEST) + "\n")
    return python


def generate(out_dir: Path | None = None, proto_dir: Path = PROTOS_DIR) -> list[Path]:
    """Compile the protos and write the stubs into ``out_dir`` (default: beside the protos).

    Needs grpcio-tools ``GRPCIO_TOOLS`` in this Python; ``main()`` finds one (``tools_python``)."""
    from grpc_tools import protoc

    out_dir = Path(out_dir) if out_dir is not None else proto_dir
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_DIR}={proto_dir}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL_DIR}/{p}" for p in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for name in generated_names():
            src = Path(tmp) / VIRTUAL_DIR / name
            if not src.exists():
                raise RuntimeError(f"protoc did not write {name}")
            dst = out_dir / name
            text = src.read_text()
            if name.endswith("_pb2.py"):
                text = _own_pool(text, name)
            dst.write_text(text)
            written.append(dst)
    return written


def _own_pool(text: str, name: str) -> str:
    """Register the file in ``cnnctl.protos.POOL`` instead of protobuf's default pool."""
    if text.count(DEFAULT_POOL) != 1:
        raise RuntimeError(f"{name}: expected one {DEFAULT_POOL} in protoc's output")
    anchor = "# @@protoc_insertion_point(imports)\n"
    if anchor not in text:
        raise RuntimeError(f"{name}: no imports insertion point in protoc's output")
    text = text.replace(anchor, POOL_IMPORT + anchor, 1)
    return text.replace(DEFAULT_POOL, OWN_POOL)


def _tools_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("grpcio-tools")
    except Exception:  # noqa: BLE001 - not installed
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: protos/)")
    args = parser.parse_args(argv)
    if _tools_version() != GRPCIO_TOOLS:
        import subprocess

        # protoc's output depends on its version: run this file under the pinned grpcio-tools.
        python = tools_python()
        out = ["--out", str(args.out)] if args.out else []
        return subprocess.run([str(python), __file__, *out]).returncode
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
