"""Every model of the zoo trains a few steps on a matching dataset, and its checkpoint round-trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from cnnctl.training.checkpoint import load_checkpoint, model_from_checkpoint
from cnnctl.training.config import from_flags
from cnnctl.training.evaluate import evaluate
from cnnctl.training.loop import Callbacks, train
from cnnctl.training.models import model_names
from cnnctl.training.transforms import prepare_batch

# The CPU loop, on any machine (tests/unit/training/test_gpu.py covers CUDA): the probes and
# the expected device below are the CPU's.
QUICK = dict(epochs=1, progress=False, plot=False, max_steps_per_epoch=3, batch_size=32,
             device="cpu")

# model -> (dataset kind, extra flags). 1-channel models train on the embedded MNIST sample (lenet5
# resizes it 28→32 per batch); 3-channel ones on a folder of small JPEGs.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lenet-classic": ("mnist-sample", {}),
    "lenet5": ("mnist-sample", {}),
    "convnet": ("mnist-sample", {}),
    "convnet3": ("mnist-sample", {}),
    "inception": ("mnist-sample", {}),
    "resnet-mini": ("mnist-sample", {}),
    "cifar-net": ("folder", {}),
    "cifar-net-v3": ("folder", {}),
    # 134M parameters: one step of batch 2, SGD without momentum so the checkpoint holds no buffers;
    # seed 004's transfer recipe: pretrained weights (head replaced), features frozen.
    "vgg16": ("folder", {"batch_size": 2, "max_steps_per_epoch": 1, "momentum": 0.0,
                         "eval_batch_size": 2, "freeze_features": True}),
}


def test_cases_cover_the_zoo() -> None:
    assert sorted(CASES) == sorted(model_names())


class Capture:
    """Keeps the trained model's outputs on a fixed batch, to compare with the reloaded one."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe = probe
        self.outputs: torch.Tensor | None = None

    def __call__(self, record: Any, model: torch.nn.Module) -> None:
        model.eval()
        with torch.inference_mode():
            self.outputs = model(self.probe.contiguous(memory_format=torch.channels_last)).clone()
        model.train()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg16" else n
                                  for n in CASES])
def test_model_trains_and_checkpoint_round_trips(
    name: str, tmp_path: Path, image_folder: Callable[..., Path]
) -> None:
    kind, extra = CASES[name]
    if kind == "folder":
        size = 40 if name == "vgg16" else 32  # vgg16: decoded and resized to 224 by the loader
        per_class = {"train": 3, "test": 1} if name == "vgg16" else None
        dataset = f"folder:{image_folder(size=size, per_class=per_class)}"
    else:
        dataset = kind
    pretrained: dict[str, torch.Tensor] = {}
    if name == "vgg16":
        from torchvision.models import vgg16

        torch.manual_seed(5)
        pretrained = vgg16(weights=None).state_dict()  # stands in for ImageNet's 1000-class file
        torch.save(pretrained, tmp_path / "vgg16.pth")
        extra = {**extra, "weights": str(tmp_path / "vgg16.pth")}
    config = from_flags(name, dataset=dataset, out=str(tmp_path / "run"),
                        **{**QUICK, "val_fraction": 0.34, **extra})
    from cnnctl.training.models import get_spec

    c, h, w = get_spec(name).input_shape
    probe_u8 = torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0))
    capture: dict[str, Capture] = {}

    def on_epoch_end(record: Any, model: torch.nn.Module) -> None:
        ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
        probe = prepare_batch(probe_u8, ckpt["normalization"]["mean"], ckpt["normalization"]["std"])
        capture["c"] = Capture(probe)
        capture["c"](record, model)

    result = train(config, Callbacks(on_epoch_end=on_epoch_end))
    assert len(result.history) == 1
    record = result.history[0]
    assert record.train_loss == record.train_loss and record.train_loss > 0  # finite, not NaN
    run = tmp_path / "run"
    assert {"best.pt", "last.pt", "metrics.csv", "config.json"} <= {p.name for p in run.iterdir()}

    ckpt = load_checkpoint(run / "last.pt", map_location="cpu")
    assert ckpt["model"] == name and ckpt["input_shape"] == [c, h, w]
    assert ckpt["epoch"] == 1 and ckpt["optimizer"] is not None
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    if pretrained:  # --weights loaded, head replaced for 2 classes, --freeze-features held
        state = ckpt["state_dict"]
        assert state["classifier.6.weight"].shape == (2, 4096)
        for key, value in pretrained.items():
            if key.startswith("features."):
                assert torch.equal(state[key], value), key
        assert not torch.equal(state["classifier.0.weight"], pretrained["classifier.0.weight"])
    reloaded = model_from_checkpoint(ckpt)
    with torch.inference_mode():
        again = reloaded(capture["c"].probe)
    assert torch.allclose(again, capture["c"].outputs, atol=1e-5, rtol=1e-4)


def test_run_dir_files_and_metrics(tmp_path: Path) -> None:
    config = from_flags("convnet", out=str(tmp_path / "run"), **{**QUICK, "epochs": 2})
    result = train(config)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= set(rows[0])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == "convnet" and saved["resolved"]["device"] == "cpu"
    best = load_checkpoint(result.best_path)
    assert best["epoch"] == result.best_epoch
    assert best["metrics"]["val_acc"] == pytest.approx(result.best_val_acc)


def test_model_selection_never_sees_the_test_split(tmp_path: Path) -> None:
    config = from_flags("convnet", out=str(tmp_path / "run"), **QUICK)
    train(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # mnist-sample: 12,000 training images, 10% held out; the 2,000 test images are never loaded.
    assert saved["resolved"]["train_images"] == 10_800
    assert saved["resolved"]["val_images"] == 1_200


def test_evaluate_reports_per_class(tmp_path: Path) -> None:
    from cnnctl.training.data import load_split
    from cnnctl.training.models import build_model

    data = load_split("mnist-sample", "test")
    model = build_model("lenet5")
    out = evaluate(model, data, [0.1307], [0.3081], "cpu", 512, size=(32, 32))
    assert out["n"] == len(data) == 2000
    assert set(out["per_class"]) == {str(i) for i in range(10)}
    assert 0.0 <= out["accuracy"] <= 1.0


def test_channel_mismatch_is_an_error_before_training(tmp_path: Path) -> None:
    from cnnctl.errors import UsageError

    config = from_flags("lenet5", dataset="cifar10", data_dir=str(tmp_path / "nothing"),
                        out=str(tmp_path / "run"), **QUICK)
    with pytest.raises(UsageError,
                       match="model lenet5 expects 1×32×32 input; dataset cifar10 gives 3×32×32"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_folder_channel_mismatch(tmp_path: Path, image_folder: Callable[..., Path]) -> None:
    """A folder is decoded to the model's channels (L or RGB), so a 1-channel model trains on RGB
    files as grayscale, as seed 004's ImageFolder + Grayscale would."""
    folder = image_folder(size=28)
    config = from_flags("convnet", dataset=f"folder:{folder}", out=str(tmp_path / "run"),
                        **{**QUICK, "val_fraction": 0.34})
    result = train(config)
    assert result.history and load_checkpoint(result.last_path)["class_names"] == ["ants", "bees"]


def test_train_val_split_matches_load_split() -> None:
    from cnnctl.training.data import load_split, load_train_val

    train_data, val_data = load_train_val("mnist-sample", val_fraction=0.1, seed=0)
    assert torch.equal(train_data.labels, load_split("mnist-sample", "train").labels)
    assert torch.equal(val_data.images, load_split("mnist-sample", "val").images)
