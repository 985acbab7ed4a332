"""Seed 002's training loop against cnnctl's default resnet-mini recipe, in one run, on full MNIST.

Measures (issue 2, Must show 3; issue 3 adds the --nproc 2 row):
  * time to 99.0% test accuracy, evaluating the test set at the end of every epoch for both loops
    (wall time from before the data is loaded to the end of the first evaluation at ≥ 99.0%);
  * training images/s of the same net at batch 64 (seed loop vs cnnctl's loop with seed 002's
    optimizer), and of cnnctl's default recipe;
  * optionally (--nproc 2) the default recipe under torchrun with 2 gloo processes.

Run timed benchmarks alone:  flock /tmp/cnnctl-bench.lock .venv/bin/python bench/train_speed.py
Writes bench/results/train_speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.99


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lscpu": [line for line in lscpu if line.split(":")[0].strip() in (
            "Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket")],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": os.getloadavg(),
    }


def seed_loop(data_dir: str, max_epochs: int) -> dict:
    """002_3b448b9890e3532f.txt as written (log_softmax + nll_loss, per-item ToTensor + Normalize
    through a DataLoader, SGD lr 0.01 momentum 0.5, batch 64, test after each epoch), with the
    net from cnnctl's zoo (the same layers) and stopping once it first reaches 99.0%."""
    from torchvision import datasets, transforms

    from cnnctl.training.models import ResNetMini

    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(1)  # the seed script's --seed default
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root=data_dir, train=True, transform=transform, download=False)
    test_set = datasets.MNIST(root=data_dir, train=False, transform=transform, download=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000, shuffle=False)
    model = ResNetMini()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    epochs, reached_at, train_s, trained = [], None, 0.0, 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(F.log_softmax(model(data), dim=1), target)
            loss.backward()
            optimizer.step()
            trained += len(target)
        train_s += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                correct += int((model(data).argmax(1) == target).sum())
        acc = correct / len(test_set)
        elapsed = time.perf_counter() - start
        epochs.append({"epoch": epoch, "test_acc": acc, "elapsed_s": round(elapsed, 2),
                       "cpu_s": round(time.process_time() - cpu_start, 2),
                       "epoch_train_s": round(time.perf_counter() - t0, 2),
                       "loadavg_1min": os.getloadavg()[0]})
        print(f"  seed epoch {epoch}: test {100 * acc:.2f}% at {elapsed:.1f}s", flush=True)
        if acc >= TARGET:
            reached_at = elapsed
            break
    return {"epochs": epochs, "time_to_99_s": reached_at, "images_per_s": trained / train_s,
            "cpu_s_to_99": epochs[-1]["cpu_s"] if reached_at else None,
            "reached": reached_at is not None}


def cnnctl_default(data_dir: str) -> dict:
    """``cnnctl train --model resnet-mini --dataset mnist`` (its default recipe), plus a test-set
    evaluation after every epoch for the measurement only (model selection uses the val slice)."""
    from cnnctl.training.config import from_flags
    from cnnctl.training.data import load_split
    from cnnctl.training.evaluate import evaluate
    from cnnctl.training.loop import Callbacks, train

    start, cpu_start = time.perf_counter(), time.process_time()
    test = load_split("mnist", "test", data_dir=data_dir)
    epochs: list[dict] = []
    reached: list[float] = []
    cpu_reached: list[float] = []

    def on_epoch_end(record, model) -> None:
        result = evaluate(model, test, [0.1307], [0.3081], "cpu", 2000, channels_last=True)
        elapsed = time.perf_counter() - start
        epochs.append({"epoch": record.epoch, "test_acc": result["accuracy"],
                       "val_acc": record.val_acc, "elapsed_s": round(elapsed, 2),
                       "cpu_s": round(time.process_time() - cpu_start, 2),
                       "images_per_s": round(record.images_per_s),
                       "loadavg_1min": os.getloadavg()[0]})
        print(f"  cnnctl epoch {record.epoch}: test {100 * result['accuracy']:.2f}% "
              f"at {elapsed:.1f}s ({record.images_per_s:.0f} img/s)", flush=True)
        if result["accuracy"] >= TARGET and not reached:
            reached.append(elapsed)
            cpu_reached.append(time.process_time() - cpu_start)

    with tempfile.TemporaryDirectory() as out:
        config = from_flags("resnet-mini", dataset="mnist", data_dir=data_dir, out=out,
                            progress=False, plot=False)
        train(config, Callbacks(on_epoch_end=on_epoch_end))
    recipe = {k: getattr(config, k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule",
                                              "momentum", "nesterov", "weight_decay")}
    return {"recipe": recipe, "epochs": epochs, "time_to_99_s": reached[0] if reached else None,
            "cpu_s_to_99": round(cpu_reached[0], 2) if cpu_reached else None,
            "reached": bool(reached),
            "images_per_s": sum(e["images_per_s"] for e in epochs) / len(epochs)}


def seed_steps(data_dir: str, steps: int) -> float:
    """Images/s of ``steps`` training steps of seed 002's loop (DataLoader + per-item transforms)."""
    from torchvision import datasets, transforms

    from cnnctl.training.models import ResNetMini

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root=data_dir, train=True, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    model = ResNetMini()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    model.train()
    t0, seen = time.perf_counter(), 0
    for step, (data, target) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        F.nll_loss(F.log_softmax(model(data), dim=1), target).backward()
        optimizer.step()
        seen += len(target)
    return seen / (time.perf_counter() - t0)


def cnnctl_steps(data_dir: str, steps: int) -> float:
    """cnnctl's loop with seed 002's optimizer and batch size: the same net, same batch, so the
    images/s difference is the data path (one uint8 tensor, per-batch normalisation) + layout."""
    from cnnctl.training.config import from_flags
    from cnnctl.training.loop import train

    with tempfile.TemporaryDirectory() as out:
        config = from_flags("resnet-mini", dataset="mnist", data_dir=data_dir, out=out,
                            progress=False, plot=False, batch_size=64, lr=0.01, momentum=0.5,
                            nesterov=False, weight_decay=0.0, schedule="none", epochs=1,
                            max_steps_per_epoch=steps)
        return train(config).history[0].images_per_s


def batch64(data_dir: str, steps: int, rounds: int) -> dict:
    """Interleaved rounds (seed, cnnctl, seed, cnnctl, …) so both see the same background load on
    this shared machine; the median round of each side is compared."""
    import statistics

    seed, ours = [], []
    for _ in range(rounds):
        seed.append(seed_steps(data_dir, steps))
        ours.append(cnnctl_steps(data_dir, steps))
        print(f"  batch 64: seed {seed[-1]:.0f} img/s, cnnctl {ours[-1]:.0f} img/s", flush=True)
    return {"steps": steps, "rounds": rounds, "seed_images_per_s": [round(v) for v in seed],
            "cnnctl_images_per_s": [round(v) for v in ours],
            "seed_median": statistics.median(seed), "cnnctl_median": statistics.median(ours),
            "images_per_s": statistics.median(ours)}


def cnnctl_ddp(data_dir: str, nproc: int) -> dict:
    """The default recipe under ``cnnctl train --nproc N`` (torchrun, gloo); the test set is
    evaluated once, on last.pt, so the time to 99% is the whole run's wall time (an upper bound)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cnnctl", "train", "--model", "resnet-mini",
                               "--dataset", "mnist", "--data-dir", data_dir, "--nproc", str(nproc),
                               "--out", out, "--no-progress", "--no-plot"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        import csv

        rows = list(csv.DictReader(open(Path(out) / "metrics.csv")))
        evaluated = subprocess.run([sys.executable, "-m", "cnnctl", "evaluate",
                                    str(Path(out) / "last.pt"), "--dataset", "mnist",
                                    "--data-dir", data_dir, "--json"],
                                   capture_output=True, text=True)
        acc = json.loads(evaluated.stdout)["accuracy"]
    return {"nproc": nproc, "wall_s": round(wall, 2), "final_test_acc": acc,
            "time_to_99_s": round(wall, 2) if acc >= TARGET else None,
            "images_per_s": sum(float(r["images_per_s"]) for r in rows) / len(rows),
            "epochs": [{k: float(v) for k, v in r.items()} for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seed-epochs", type=int, default=8, help="cap for the seed loop")
    parser.add_argument("--batch64-steps", type=int, default=200)
    parser.add_argument("--batch64-rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=0, help="also run --nproc N (0: skip)")
    parser.add_argument("--skip-seed", action="store_true", help="reuse the seed rows of the JSON")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_speed.json"))
    args = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    results: dict = {"machine": machine()}
    if args.skip_seed and "seed" in previous:
        results["seed"] = previous["seed"]
        results["seed"]["reused_from"] = previous["machine"]["date"]
    else:
        print("seed 002 loop (batch 64, SGD 0.01/0.5, per-item transforms):", flush=True)
        results["seed"] = seed_loop(args.data_dir, args.seed_epochs)
    print("cnnctl default recipe:", flush=True)
    results["cnnctl"] = cnnctl_default(args.data_dir)
    print("batch 64, same net, seed 002's optimizer, interleaved:", flush=True)
    results["cnnctl_batch64"] = batch64(args.data_dir, args.batch64_steps, args.batch64_rounds)
    if args.nproc:
        print(f"cnnctl default recipe, --nproc {args.nproc}:", flush=True)
        results["cnnctl_ddp"] = cnnctl_ddp(args.data_dir, args.nproc)
    elif "cnnctl_ddp" in previous:
        results["cnnctl_ddp"] = previous["cnnctl_ddp"]
    seed, ours = results["seed"], results["cnnctl"]
    results["speedup_time_to_99"] = (seed["time_to_99_s"] / ours["time_to_99_s"]
                                     if seed["time_to_99_s"] and ours["time_to_99_s"] else None)
    results["speedup_images_per_s_batch64"] = (results["cnnctl_batch64"]["cnnctl_median"]
                                               / results["cnnctl_batch64"]["seed_median"])
    results["speedup_cpu_time_to_99"] = (seed["cpu_s_to_99"] / ours["cpu_s_to_99"]
                                         if seed.get("cpu_s_to_99") and ours.get("cpu_s_to_99")
                                         else None)
    results["machine"]["loadavg_after"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    def t(v: float | None) -> str:
        return f"{v:.1f} s" if v else "not reached"

    seed, ours, b64 = r["seed"], r["cnnctl"], r["cnnctl_batch64"]
    lines = [
        "| loop | time to 99.0% test | epochs run | best test acc | train img/s |",
        "|---|---|---|---|---|",
        f"| seed 002 (batch 64, SGD 0.01/0.5, DataLoader + per-item ToTensor/Normalize) | "
        f"{t(seed['time_to_99_s'])} | {len(seed['epochs'])} | "
        f"{100 * max(e['test_acc'] for e in seed['epochs']):.2f}% | {seed['images_per_s']:.0f} |",
        f"| cnnctl default recipe ({ours['recipe']['epochs']} epochs, batch "
        f"{ours['recipe']['batch_size']}, SGD nesterov lr {ours['recipe']['lr']} onecycle) | "
        f"{t(ours['time_to_99_s'])} | {len(ours['epochs'])} | "
        f"{100 * max(e['test_acc'] for e in ours['epochs']):.2f}% | {ours['images_per_s']:.0f} |",
        f"| seed 002's loop at batch 64, median of {b64['rounds']} interleaved rounds of "
        f"{b64['steps']} steps | – | – | – | {b64['seed_median']:.0f} |",
        f"| cnnctl loop, seed 002's optimizer at batch 64, same rounds | – | – | – | "
        f"{b64['cnnctl_median']:.0f} |",
    ]
    if "cnnctl_ddp" in r and "error" not in r["cnnctl_ddp"]:
        d = r["cnnctl_ddp"]
        lines.append(f"| cnnctl default recipe, `--nproc {d['nproc']}` (gloo; whole run incl. "
                     f"process start) | {t(d['time_to_99_s'])} | {len(d['epochs'])} | "
                     f"{100 * d['final_test_acc']:.2f}% (last) | {d['images_per_s']:.0f} |")
    speed = r["speedup_time_to_99"]
    lines.append("")
    cpu = r.get("speedup_cpu_time_to_99")
    lines.append(f"Time to 99%: {'%.1f×' % speed if speed else 'n/a'} sooner in wall time "
                 f"({'%.1f×' % cpu if cpu else 'n/a'} in process CPU time: "
                 f"{seed.get('cpu_s_to_99')} s vs {ours.get('cpu_s_to_99')} s); "
                 f"images/s at batch 64: {r['speedup_images_per_s_batch64']:.2f}×.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
