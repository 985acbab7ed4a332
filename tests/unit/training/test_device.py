"""device.py's process-wide CPU settings."""

from __future__ import annotations

import os

import pytest

from cnnctl.training.device import keep_freed_memory


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibcs_thresholds() -> None:
    assert keep_freed_memory() is True


def test_training_on_the_cpu_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnctl.training import device
    from cnnctl.training.config import from_flags

    calls: list[bool] = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert device.place(from_flags("lenet5", device="cpu")).device.type == "cpu"
    assert calls == [True]
