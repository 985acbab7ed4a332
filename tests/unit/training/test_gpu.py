"""The GPU path. Precision choices are testable on CPU; the rest needs CUDA and skips without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnctl.training.checkpoint import load_checkpoint, model_from_checkpoint
from cnnctl.training.config import from_flags
from cnnctl.training.device import cpu_bf16_works, resolve_precision, select_device
from cnnctl.training.loop import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_defaults_fp32_channels_last() -> None:
    p = resolve_precision(from_flags("resnet-mini"), torch.device("cpu"))
    assert (p.amp, p.grad_scaling, p.channels_last) == (False, False, True)


def test_cpu_amp_is_bf16_or_falls_back() -> None:
    p = resolve_precision(from_flags("resnet-mini", amp=True), torch.device("cpu"))
    if cpu_bf16_works():
        assert p.amp and p.dtype == torch.bfloat16 and not p.grad_scaling
    else:
        assert not p.amp


def test_cpu_amp_without_native_bf16_says_so_and_trains_fp32(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import cnnctl.training.device as device

    monkeypatch.setattr(device, "cpu_bf16_native", lambda: False)
    with caplog.at_level("WARNING", logger=device.log.name):
        p = resolve_precision(from_flags("resnet-mini", amp=True), torch.device("cpu"))
    assert (p.amp, p.dtype) == (False, None)
    assert "no native bf16" in caplog.text and "float32" in caplog.text


def test_cpu_amp_whose_trial_conv_fails_says_that(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import cnnctl.training.device as device

    monkeypatch.setattr(device, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(device, "cpu_bf16_works", lambda: False)
    with caplog.at_level("WARNING", logger=device.log.name):
        p = resolve_precision(from_flags("resnet-mini", amp=True), torch.device("cpu"))
    assert (p.amp, p.dtype) == (False, None)
    assert "does not work" in caplog.text and "no native" not in caplog.text


def test_cpu_amp_trains(tmp_path: Path) -> None:
    if not cpu_bf16_works():
        pytest.skip("no bf16 autocast on this CPU")
    result = train(from_flags("convnet", amp=True, epochs=1, max_steps_per_epoch=3, progress=False,
                              plot=False, out=str(tmp_path / "run")))
    assert result.history[0].train_loss == result.history[0].train_loss  # not NaN
    ckpt = load_checkpoint(result.last_path)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())


def test_auto_device_says_which() -> None:
    device, why = select_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert why.startswith(device.type)


@pytest.mark.cuda
@cuda
def test_cuda_fp16_uses_grad_scaling() -> None:
    p = resolve_precision(from_flags("resnet-mini", amp_dtype="fp16"), torch.device("cuda"))
    assert p.amp and p.dtype == torch.float16 and p.grad_scaling


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("flags", [{}, {"amp_dtype": "fp16"}, {"compile": True}])
def test_cuda_training_and_cpu_reload(flags: dict, tmp_path: Path) -> None:
    result = train(from_flags("resnet-mini", epochs=1, max_steps_per_epoch=20, progress=False,
                              plot=False, out=str(tmp_path / "run"), **flags))
    assert result.device.startswith("cuda")
    ckpt = load_checkpoint(result.last_path, map_location="cpu")
    model_from_checkpoint(ckpt)  # a GPU-trained checkpoint on CPU
    if flags.get("amp_dtype") == "fp16":
        assert ckpt["scaler"] is not None


@pytest.mark.slow
def test_compile_on_cpu(tmp_path: Path) -> None:
    """--compile: inductor needs a C compiler and ~50 s on 2 cores, hence slow."""
    result = train(from_flags("convnet", compile=True, epochs=1, max_steps_per_epoch=3,
                              progress=False, plot=False, out=str(tmp_path / "run")))
    ckpt = load_checkpoint(result.last_path)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["state_dict"])
    model_from_checkpoint(ckpt)
