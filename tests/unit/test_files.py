"""cnnctl/files.py: the one atomic writer (checkpoints, run-dir files, manifests, caches)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnnctl.files import replacing, write_atomic, write_atomic_with


def test_text_and_bytes_replace_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_atomic(path, "first ✓\n")
    assert path.read_text(encoding="utf-8") == "first ✓\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    write_atomic(path, b"epoch 1")

    def crash(f: object) -> None:
        f.write(b"half of epoch 2")  # type: ignore[attr-defined]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_atomic_with(path, crash)
    assert path.read_bytes() == b"epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_new_files_get_the_umasks_permissions(tmp_path: Path) -> None:
    """Like any file the user's tools write, not the 0600 of a bare mkstemp."""
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_replacing_renames_whatever_the_block_made(tmp_path: Path) -> None:
    source, target = tmp_path / "last.pt", tmp_path / "best.pt"
    source.write_bytes(b"weights")
    target.write_bytes(b"older weights")
    with replacing(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()
        os.link(source, tmp)
    assert target.read_bytes() == b"weights" and target.stat().st_ino == source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
