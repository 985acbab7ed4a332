"""glibc malloc thresholds, set once per process by the commands that need them.

Left to itself glibc serves blocks above a dynamic mmap threshold with mmap (a fresh mapping,
page-faulted 4 KiB at a time, unmapped on free) and hands heap memory back above its trim
threshold. A server allocating the same request buffers, or a training step the same activation
buffers, over and over then pays page faults on every one; raising both thresholds keeps freed
blocks in the heap for the next request or step.
"""

from __future__ import annotations

import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_memory(mmap_threshold: int, trim_threshold: int) -> bool:
    """Blocks up to ``mmap_threshold`` bytes come from the heap, which keeps up to
    ``trim_threshold`` bytes free at its top. False (nothing set) where the C library is not
    glibc."""
    import ctypes

    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)  # this process's own C library: glibc, checked above
    except (ValueError, OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
