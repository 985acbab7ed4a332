"""Issue 3: an interrupted run resumed from last.pt ends with the weights of the uninterrupted run;
killing the process mid-write leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from cnnctl.training.checkpoint import load_checkpoint
from cnnctl.training.config import TrainConfig, from_flags
from cnnctl.training.loop import Callbacks, train


class Interrupt(Exception):
    pass


def _stop_after(epoch: int) -> Callbacks:
    def on_epoch_end(record: Any, model: Any) -> None:
        if record.epoch == epoch:
            raise Interrupt  # as if the process died right after last.pt was written

    return Callbacks(on_epoch_end=on_epoch_end)


@pytest.mark.parametrize("name", ["resnet-mini", "cifar-net-v3"])
def test_resumed_run_matches_uninterrupted(name: str, tmp_path: Path,
                                           image_folder: Callable[..., Path]) -> None:
    # cifar-net-v3 exercises dropout (global RNG), BatchNorm buffers, crop-flip augmentation and
    # the multistep schedule; resnet-mini the onecycle schedule and Nesterov momentum buffers.
    if name == "cifar-net-v3":
        extra = dict(dataset=f"folder:{image_folder(per_class={'train': 12, 'test': 2})}",
                     batch_size=4, milestones=(1, 2), val_fraction=0.25)
    else:
        extra = dict(dataset="mnist-sample", batch_size=64)
    common = dict(epochs=3, max_steps_per_epoch=4, progress=False, plot=False, seed=7,
                  channels_last=False, **extra)
    full = train(from_flags(name, out=str(tmp_path / "full"), **common))
    with pytest.raises(Interrupt):
        train(from_flags(name, out=str(tmp_path / "cut"), **common), _stop_after(1))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train(TrainConfig(progress=False), resume=tmp_path / "cut")

    a = load_checkpoint(full.last_path)
    b = load_checkpoint(resumed.last_path)
    assert b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=0), key
    assert [r.val_acc for r in full.history] == [r.val_acc for r in resumed.history]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_resume_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    config = from_flags("convnet", epochs=1, max_steps_per_epoch=2, progress=False, plot=False,
                        out=str(tmp_path / "run"))
    train(config)
    before = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    result = train(TrainConfig(progress=False), resume=tmp_path / "run")
    assert len(result.history) == 1
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == before


_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from cnnctl.training.checkpoint import save_checkpoint, make_checkpoint
    from cnnctl.training.models import build_model
    path, mode = sys.argv[1], sys.argv[2]
    def ckpt(epoch, size):
        c = make_checkpoint(model=build_model("convnet"), model_name="convnet", num_classes=10,
                            in_channels=1, input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                            class_names=[str(i) for i in range(10)], dataset="x", epoch=epoch)
        c["padding"] = torch.zeros(size)  # a big payload: the write takes a while
        return c
    save_checkpoint(ckpt(1, 10), path)
    if mode == "hang":
        real = os.fsync
        def hang(fd):
            real(fd)
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = hang
        save_checkpoint(ckpt(2, 10), path)
    else:
        print("writing", flush=True)
        for epoch in range(2, 1000):
            save_checkpoint(ckpt(epoch, 25_000_000), path)
""")


@pytest.mark.parametrize("mode, delay", [("hang", 0.0), ("loop", 0.3), ("loop", 0.8)])
def test_kill_during_checkpoint_write_leaves_previous_loadable(mode: str, delay: float,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), mode],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        if delay:
            import time

            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] >= 1
    if mode == "hang":
        assert ckpt["epoch"] == 1  # killed after the temp file's fsync, before the rename
    assert ckpt["model"] == "convnet"
