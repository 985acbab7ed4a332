"""Regenerate the Python stubs from the .proto files: ``python -m cnnctl.protos.generate``.

The protos are compiled under the virtual path ``cnnctl/protos/`` so that the generated modules
import each other as ``cnnctl.protos.xxx_pb2`` and register themselves in protobuf's descriptor pool
as ``cnnctl/protos/*.proto``. tests/unit/serving/test_protos.py regenerates into a temporary
directory and checks the committed stubs are identical.

Note: the message full names are Triton's (``inference.ModelInferRequest``...), so these stubs and
``tritonclient.grpc``'s cannot both be imported into one Python process (protobuf refuses the
duplicate symbols). Run tritonclient in another process than anything importing cnnctl.protos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
VIRTUAL_DIR = "cnnctl/protos"


def generated_names() -> list[str]:
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def generate(out_dir: Path | None = None, proto_dir: Path = PROTOS_DIR) -> list[Path]:
    """Compile the protos and write the stubs into ``out_dir`` (default: beside the protos)."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

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
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
