"""Issue 3: two CPU processes with gloo train data-parallel; the ranks end equal, and the checkpoint
rank 0 writes loads like a single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cnnctl.training.checkpoint import load_checkpoint, model_from_checkpoint
from cnnctl.training.data import MemorySource, load_split

_WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from cnnctl.training.config import from_flags
    from cnnctl.training.loop import train
    out = sys.argv[1]
    config = from_flags("resnet-mini", dataset="mnist-sample", epochs=2, max_steps_per_epoch=4,
                        batch_size=64, progress=False, plot=False, out=out, seed=3)
    result = train(config)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save(state, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    from cnnctl.training.distributed import leave_worker
    leave_worker(0)  # destroys the process group; no interpreter teardown (see its docstring)
""")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_two_gloo_processes_stay_in_sync(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    for key, value in rank0.items():
        assert torch.equal(ckpt["state_dict"][key], value), key
    model = model_from_checkpoint(ckpt)  # exactly as for a single-process checkpoint
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["per_process_batch"] == 32
    assert not (out / "rank1").exists()


@pytest.mark.slow
def test_cli_nproc_launches_torchrun(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cnnctl", "train", "--model", "convnet",
                           "--nproc", "2", "--epochs", "1", "--max-steps", "3", "--no-progress",
                           "--no-plot", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    assert done.stdout.count("epoch 1:") == 1  # only rank 0 prints
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["world_size"] == 2 and ckpt["model"] == "convnet"


@pytest.mark.slow
def test_cnnctl_train_runs_under_the_users_own_torchrun(tmp_path: Path) -> None:
    """The documented multi-node form (`torchrun ... -m cnnctl train ...`), here on one node."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "cnnctl", "train", "--model", "convnet",
                           "--epochs", "1", "--max-steps", "3", "--no-progress", "--no-plot",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1:") == 1  # only rank 0 prints
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["world_size"] == 2 and ckpt["model"] == "convnet"


def test_ranks_get_disjoint_shards_reshuffled_each_epoch() -> None:
    data = load_split("mnist-sample", "val")
    source = MemorySource(data, torch.device("cpu"))
    shards = {(e, r): source.shard(seed=0, epoch=e, rank=r, world=2) for e in (1, 2) for r in (0, 1)}
    for e in (1, 2):
        a, b = shards[(e, 0)], shards[(e, 1)]
        assert len(a) == len(b) == len(data) // 2
        assert not set(a.tolist()) & set(b.tolist())
    assert not torch.equal(shards[(1, 0)], shards[(2, 0)])


def test_resume_with_nproc_launches_the_saved_run(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --resume RUN --nproc N`: torchrun gets the saved configuration (its batch size is
    the one that must divide among the N processes), with --nproc N."""
    from click.testing import CliRunner

    import cnnctl.training.commands as commands
    from cnnctl.training.config import from_flags
    from cnnctl.training.loop import train

    run = tmp_path / "run"
    train(from_flags("convnet", epochs=1, max_steps_per_epoch=1, batch_size=96, progress=False,
                     plot=False, out=str(run)))
    launched = []
    monkeypatch.setattr(commands, "_launch",
                        lambda config, resume, epochs=None: launched.append((config, resume)))
    result = CliRunner().invoke(commands.train, ["--resume", str(run), "--nproc", "3"])
    assert result.exit_code == 0, result.output
    [(config, resume)] = launched
    assert (config.batch_size, config.nproc, config.model, resume) == (96, 3, "convnet", str(run))
