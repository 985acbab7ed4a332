"""Multi-process data-parallel training: ``cnnctl train --nproc N`` starts torchrun.

Training reads (device.py, ``place``) torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), so any
torchrun invocation works, including multi-node:

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m cnnctl train --model resnet-mini --dataset mnist --out runs/ddp

``--nproc`` on one machine is a shortcut: it writes the resolved configuration to the run directory
and starts ``torchrun --standalone`` on this module, so every rank trains with exactly that config.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from cnnctl.files import write_atomic
from cnnctl.training.config import TrainConfig

log = logging.getLogger(__name__)


def launch(config: TrainConfig, resume: str | os.PathLike[str] | None = None,
           epochs: int | None = None) -> int:
    """Run ``config`` in ``config.nproc`` processes on this machine; returns torchrun's exit code.
    SIGTERM is passed on to torchrun, which passes it to the workers (each writes last.pt at the
    next step and exits)."""
    from cnnctl.training.rundir import new_run_dir

    run_dir = Path(resume) if resume else Path(config.out or new_run_dir(config.model))
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config.replace(out=str(run_dir))
    spec_path = write_atomic(run_dir / "launch.json", json.dumps(
        {"config": config.to_dict(), "resume": str(resume) if resume else None,
         "epochs": epochs}) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={config.nproc}", "-m", "cnnctl.training.distributed", str(spec_path)]
    env = dict(os.environ)
    # torchrun's default of one thread per process is what we want on CPU too; be explicit.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc)))
    log.info("starting: %s", " ".join(cmd))
    import signal

    child = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """One torchrun worker: train the configuration ``launch`` wrote."""
    import click

    from cnnctl.errors import CnnctlError
    from cnnctl.training.echo import echo_callbacks, echo_result
    from cnnctl.training.loop import Preempted, train

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        config = TrainConfig.from_dict(spec["config"])
        result = train(config, callbacks=echo_callbacks(), resume=spec.get("resume"),
                       epochs=spec.get("epochs"))
    except Preempted as exc:
        click.echo(f"preempted: {exc}", err=True)
        return exc.exit_code
    except CnnctlError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        echo_result(result)
    return 0


def leave_worker(code: int) -> NoReturn:
    """End a torchrun worker whose work is done (checkpoints written, output printed) without the
    interpreter's teardown, where a finished gloo rank was sometimes killed by a C++
    std::terminate and torchrun reported the whole run failed (docs/training.md)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    leave_worker(main())  # an unexpected exception still propagates, with its traceback
