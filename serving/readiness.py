"""Before a loaded model is ready: warm it up and check its answers against the golden set.

Runs in a loader thread (blocking), on the sessions the model will serve with: the golden set
(export/golden.py) through the artifact's own image spec and the chosen provider and precision,
judged with the manifest's tolerance for that precision. Warm-up runs every session the runtime
picks between (runtime.py: a 1-thread one for small batches, the all-core one for big ones) at
the batch sizes they will see, so the first requests after a swap do not pay ORT's first-run
allocations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnctl.errors import ArtifactError
from cnnctl.export.golden import compare, has_golden, read_golden, tolerance_for
from cnnctl.export.manifest import Manifest
from cnnctl.serving.runtime import CUDA, OrtModel

SINGLES = 8  # golden images also run one at a time


@dataclass(frozen=True)
class Readiness:
    verified: bool  # the golden set ran and matched
    note: str  # what was checked, or why nothing was
    seconds: float  # warm-up and check together


def warm_up(runtime: OrtModel, manifest: Manifest, max_batch_size: int) -> None:
    """Run batch sizes 1 and max_batch_size once each (zeros): both sessions, their arenas
    sized for the largest batch."""
    shape = manifest.input.shape[1:]
    for n in sorted({1, max(1, runtime.info.parallel_from), max_batch_size}):
        runtime.run(np.zeros([n, *shape], dtype=np.float32))


def check_golden(runtime: OrtModel, directory: Path, manifest: Manifest,
                 max_batch_size: int) -> str:
    """The golden check on ``runtime``; ArtifactError naming what does not match."""
    golden = read_golden(directory, manifest)
    precision = runtime.info.precision
    tolerance = tolerance_for(manifest, precision, gpu=runtime.info.provider == CUDA)
    x = golden.inputs(manifest)
    step = max(1, max_batch_size)
    got = np.concatenate([runtime.run(x[i:i + step]) for i in range(0, len(x), step)])
    result = compare(got, golden, tolerance)
    if result.passed:
        # A few one at a time as well: small batches run in a session of their own (runtime.py).
        few = golden.head(SINGLES)
        singles = np.concatenate([runtime.run(x[i:i + 1]) for i in range(len(few.logits))])
        one_by_one = compare(singles, few, tolerance)
        if not one_by_one.passed:
            result = one_by_one
    where = f"{runtime.info.provider} {precision}"
    if not result.passed:
        raise ArtifactError(f"golden check failed on {where}: {'; '.join(result.failures)} "
                            f"({result.images} golden images, {golden.dataset or 'unlabelled'})")
    return f"golden check passed on {where}: {result.summary()}"


def make_ready(runtime: OrtModel, directory: Path, manifest: Manifest, max_batch_size: int,
               golden_check: bool = True) -> Readiness:
    """Warm-up, then (when asked and the artifact has one) the golden check. Blocking."""
    start = time.perf_counter()
    warm_up(runtime, manifest, max_batch_size)
    if not golden_check:
        note = "golden check off (--no-golden-check): readiness unverified"
        verified = False
    elif not has_golden(manifest):
        note = ("the artifact has no golden set (exported before cnnctl stored one): readiness "
                "unverified; re-export it to verify its answers at load")
        verified = False
    else:
        note = check_golden(runtime, directory, manifest, max_batch_size)
        verified = True
    return Readiness(verified, note, time.perf_counter() - start)
