"""Classify every PNG/JPEG image in a folder with a model served by `cnnctl serve`; print a table.

    python examples/classify_folder.py IMAGE_DIR --server 127.0.0.1:8001 --model resnet-mini

A minimal client app: the cnnctl client library only (grpc + numpy + PIL, no torch). Images are
sent in chunks the server accepts (the client splits them), with a deadline per call; a server
that is down or restarting is retried with backoff, and any other failure stops with the server's
own message. With ``--labels`` (file names like ``digit3_7.png``, the true class after the last
``_``) it also prints the accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cnnctl.clients import Client
from cnnctl.clients.images import list_images
from cnnctl.errors import CnnctlError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--server", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline for the call (s)")
    parser.add_argument("--labels", action="store_true",
                        help="true class is the file name's last '_' part; print the accuracy")
    args = parser.parse_args(argv)
    try:
        files = list_images(args.folder)
        with Client(args.server, timeout=args.timeout) as client:
            client.wait_until_ready(timeout=10)
            start = time.perf_counter()
            results = client.predict(args.model, files, top_k=args.top_k)
            seconds = time.perf_counter() - start
    except CnnctlError as exc:  # typed: NotFound, InvalidArgument, Unavailable, ... (server's words)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(len(f.name) for f in files)
    print(f"{'FILE':<{width}}  {'LABEL':<8} {'PROB':>6}  TOP-{args.top_k}")
    correct = 0
    for f, r in zip(files, results):
        others = "  ".join(f"{lb}:{p:.2f}" for lb, p in zip(r.labels, r.probabilities))
        print(f"{f.name:<{width}}  {r.label:<8} {r.probability:>6.3f}  {others}")
        correct += args.labels and f.stem.rsplit("_", 1)[-1] == r.label
    print(f"{len(files)} images in {seconds * 1e3:.0f} ms ({len(files) / seconds:,.0f} images/s)")
    if args.labels:
        print(f"accuracy: {correct}/{len(files)} = {100 * correct / len(files):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
