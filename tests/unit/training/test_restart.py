"""Issue 23: training survives restarts and preemption. A run killed mid-epoch (SIGKILL) and started
again with the same command ends equal to an uninterrupted one; SIGTERM writes last.pt at the next
step and exits 143; torchrun's --max-restarts brings a killed worker back and the run finishes; a
finished run trained longer with --resume DIR --epochs N trains the added epochs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnctl.errors import UsageError
from cnnctl.training.checkpoint import load_checkpoint
from cnnctl.training.config import TrainConfig, from_flags
from cnnctl.training.device import cpu_count
from cnnctl.training.loop import train

# resnet-mini (the default model) on the embedded sample: 2 epochs of 12 steps, a checkpoint every
# 5 steps, so a kill lands inside an epoch with a mid-epoch last.pt to continue from.
TRAIN = [sys.executable, "-m", "cnnctl", "train", "--dataset", "mnist-sample", "--epochs", "2",
         "--max-steps", "12", "--batch-size", "16", "--seed", "3", "--no-progress", "--no-plot",
         "--checkpoint-every-steps", "5"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.005)


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = load_checkpoint(a_dir / "last.pt"), load_checkpoint(b_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and "position" not in b
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    fields = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[f] for f in fields] for r in a["history"]] == \
        [[r[f] for f in fields] for r in b["history"]]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    done = subprocess.run(TRAIN + ["--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# The same with each step's batch split across 2 cores (training/split.py): 2 slices of 16.
TRAIN_SPLIT = [("32" if a == "16" else a) for a in TRAIN] + ["--cpu-split"]


@pytest.mark.skipif(cpu_count() < 2, reason="needs 2 cores to split a batch across")
def test_killed_split_run_restarted_ends_equal(tmp_path: Path) -> None:
    full = tmp_path / "full"
    done = subprocess.run(TRAIN_SPLIT + ["--out", str(full)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch split 2 ways" in done.stdout
    out = tmp_path / "run"
    proc = subprocess.Popen(TRAIN_SPLIT + ["--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(out / "last.pt", proc)  # mid-epoch, as above
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    again = subprocess.run(TRAIN_SPLIT + ["--out", str(out)], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at epoch" in again.stdout
    _assert_same_run(full, out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_restarted_with_the_same_command_ends_equal(sig: int, uninterrupted: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + ["--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(out / "last.pt", proc)  # the first mid-epoch checkpoint (step 5 of epoch 1)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        # SIGTERM: last.pt written at the next step boundary, exit 128 + 15 (torchrun and
        # Kubernetes' ExitCode policy restart it), one line saying where it stopped.
        assert proc.returncode == 143, err[-2000:]
        assert "preempted: stopped by SIGTERM at epoch" in err
        ckpt = load_checkpoint(out / "last.pt")
        stopped = ckpt.get("position", {}).get("step")
        assert stopped is not None and f"step {stopped};" in err
    again = subprocess.run(TRAIN + ["--out", str(out)], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at epoch" in again.stdout
    _assert_same_run(uninterrupted, out)

    # Once finished, the same command again trains nothing and succeeds (a restarted pod).
    before = (out / "last.pt").stat().st_mtime_ns
    rerun = subprocess.run(TRAIN + ["--out", str(out)], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert rerun.returncode == 0 and "nothing to train" in rerun.stdout
    assert (out / "last.pt").stat().st_mtime_ns == before


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "cnnctl"] + TRAIN[3:] + ["--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        _wait_for(out / "last.pt", proc, timeout=180)
        workers = [p for p in _children(proc.pid)
                   if b"cnnctl" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # one worker dies; torchrun restarts the group
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming at epoch" in stdout, stdout
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and "position" not in ckpt
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2]


def _tiny(out: Path, **changes: Any) -> TrainConfig:
    flags: dict[str, Any] = dict(dataset="mnist-sample", epochs=1, max_steps_per_epoch=4,
                                 batch_size=32, progress=False, plot=False, seed=1, out=str(out))
    return from_flags("lenet5", **{**flags, **changes})


def test_extended_run_trains_the_added_epochs_with_a_new_cycle(tmp_path: Path) -> None:
    first = train(_tiny(tmp_path / "run"))
    before = load_checkpoint(first.last_path)
    result = train(TrainConfig(progress=False, plot=False), resume=tmp_path / "run", epochs=3)
    assert [r.epoch for r in result.history] == [1, 2, 3]
    after = load_checkpoint(result.last_path)
    assert after["epoch"] == 3 and after["config"]["epochs"] == 3
    assert after["schedule_start"] == 1
    assert any(not torch.equal(v, after["state_dict"][k]) for k, v in before["state_dict"].items())
    # A new one-cycle over the 8 added steps: it warmed up again (lr rose above where epoch 1
    # ended) and annealed to the same floor.
    assert result.history[1].lr > result.history[0].lr
    assert result.history[2].lr == pytest.approx(result.history[0].lr)
    assert after["scheduler"]["total_steps"] == 2 * 4 + 1

    # The extended run resumes like any other: the same command continues, nothing left to do.
    again = train(TrainConfig(progress=False, plot=False), resume=tmp_path / "run", epochs=3)
    assert len(again.history) == 3
    with pytest.raises(UsageError, match="already trained 3 epochs"):
        train(TrainConfig(progress=False), resume=tmp_path / "run", epochs=2)


def test_out_with_another_configuration_is_an_error_naming_it(tmp_path: Path) -> None:
    train(_tiny(tmp_path / "run"))
    with pytest.raises(UsageError, match=r"lr 0\.05 there, 0\.02 now"):
        train(_tiny(tmp_path / "run", lr=0.02))
    # How it runs may change: a restart on another device or without progress bars continues.
    assert len(train(_tiny(tmp_path / "run", plot=True)).history) == 1


def test_cli_resume_refuses_flags_it_would_ignore(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cnnctl.cli import cli

    train(_tiny(tmp_path / "run"))
    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "run"), "--lr", "0.5"])
    assert result.exit_code != 0
    assert "--lr cannot change" in str(result.exception or result.output)
