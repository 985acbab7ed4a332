from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnctl.errors import CheckpointError
from cnnctl.training.checkpoint import (import_state_dict, link_or_copy, load_checkpoint,
                                        make_checkpoint, model_from_checkpoint, save_checkpoint)
from cnnctl.training.config import from_flags
from cnnctl.training.loop import train
from cnnctl.training.models import build_model


def _seed_style_state_dict(prefix: str = "module.") -> tuple[torch.nn.Module, dict]:
    """What 001's script saves: blocks named rblock1/rblock2, head named linear, under DataParallel."""
    torch.manual_seed(0)
    model = build_model("resnet-mini").eval()
    aliases = {"res_block_1.": "rblock1.", "res_block_2.": "rblock2.", "fc1.": "linear."}
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in aliases.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        state[prefix + key] = value.clone()
    return model, state


def test_bare_seed_state_dict_imports_by_naming_the_model(tmp_path: Path) -> None:
    model, state = _seed_style_state_dict()
    torch.save(state, tmp_path / "seed.pth")
    ckpt = import_state_dict(tmp_path / "seed.pth", "resnet-mini")
    assert ckpt["normalization"] == {"mean": [0.1307], "std": [0.3081]}  # what 001/002 trained with
    save_checkpoint(ckpt, tmp_path / "imported.pt")
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "imported.pt"))
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(reloaded(x), model(x))


def test_state_dict_flag_sets_the_starting_weights(tmp_path: Path) -> None:
    model, state = _seed_style_state_dict(prefix="")
    torch.save(state, tmp_path / "seed.pth")
    # lr 1e-12 and one step: the trained weights are the imported ones to float precision.
    config = from_flags("resnet-mini", state_dict=str(tmp_path / "seed.pth"), epochs=1, lr=1e-12,
                        max_steps_per_epoch=1, progress=False, plot=False, weight_decay=0.0,
                        out=str(tmp_path / "run"))
    train(config)
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.allclose(trained[key], value, atol=1e-6), key


def test_state_dict_of_another_model_is_a_readable_error(tmp_path: Path) -> None:
    torch.save(build_model("convnet").state_dict(), tmp_path / "convnet.pth")
    with pytest.raises(CheckpointError, match="weights do not fit model resnet-mini: missing"):
        import_state_dict(tmp_path / "convnet.pth", "resnet-mini")


def test_pickled_payload_is_refused(tmp_path: Path) -> None:
    torch.save(build_model("convnet"), tmp_path / "whole.pth")  # torch.save(model), as 004 does
    with pytest.raises(CheckpointError, match="refused: the file holds a pickled Python object"):
        load_checkpoint(tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="refused"):
        import_state_dict(tmp_path / "whole.pth", "convnet")


def test_bare_state_dict_as_checkpoint_gets_a_hint(tmp_path: Path) -> None:
    torch.save(build_model("convnet").state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="--model NAME --state-dict PATH"):
        load_checkpoint(tmp_path / "bare.pth")


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    model = build_model("convnet")
    ckpt = make_checkpoint(model=model, model_name="convnet", num_classes=10, in_channels=1,
                           input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                           class_names=[str(i) for i in range(10)], dataset="x")
    ckpt["format_version"] = 99
    save_checkpoint(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load_checkpoint(tmp_path / "future.pt")


def test_best_survives_last_being_replaced(tmp_path: Path) -> None:
    model = build_model("convnet")
    kwargs = dict(model=model, model_name="convnet", num_classes=10, in_channels=1,
                  input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                  class_names=[str(i) for i in range(10)], dataset="x")
    save_checkpoint(make_checkpoint(epoch=1, **kwargs), tmp_path / "last.pt")
    link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    save_checkpoint(make_checkpoint(epoch=2, **kwargs), tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    model = build_model("convnet").cuda()
    ckpt = make_checkpoint(model=model, model_name="convnet", num_classes=10, in_channels=1,
                           input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                           class_names=[str(i) for i in range(10)], dataset="x",
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    torch.save(ckpt, tmp_path / "gpu.pt")  # bypass the CPU copy make_checkpoint does
    loaded = load_checkpoint(tmp_path / "gpu.pt")
    assert all(v.device.type == "cpu" for v in loaded["state_dict"].values())
    model_from_checkpoint(loaded)
