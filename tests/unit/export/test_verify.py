from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnctl.errors import DataError, VerificationError
from cnnctl.export import verify
from cnnctl.export.onnx import export_onnx
from cnnctl.export.torchscript import export_torchscript, load_torchscript, quiet_jit
from cnnctl.training.checkpoint import load_checkpoint, model_from_checkpoint

from .helpers import perturb_onnx_weight

MEAN, STD = [0.1307], [0.3081]


@pytest.fixture(scope="module")
def lenet5(trained_checkpoints: dict[str, Path]) -> torch.nn.Module:
    return model_from_checkpoint(load_checkpoint(trained_checkpoints["lenet5"]), check_inputs=False)


@pytest.fixture(scope="module")
def real() -> verify.RealImages:
    return verify.load_real_images("mnist-sample", None, (1, 32, 32), MEAN, STD, max_images=500)


def _verify(model: torch.nn.Module, d: Path, files: list[tuple[str, str, str]],
            real: verify.RealImages) -> verify.Report:
    return verify.verify_files(model, d, files, input_shape=(1, 32, 32), mean=MEAN, std=STD,
                               real=real)


def test_prepare_batch_scales_resizes_and_normalises() -> None:
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = verify.prepare_batch(images, MEAN, STD, (32, 32))
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (1 - 0.1307) / 0.3081))


def test_good_onnx_and_torchscript_pass_with_accuracy_reported(
    lenet5: torch.nn.Module, real: verify.RealImages, tmp_path: Path
) -> None:
    export_onnx(lenet5, (1, 32, 32), tmp_path / "m.onnx")
    export_torchscript(lenet5, (1, 32, 32), tmp_path / "m.pt", {"k": 1})
    report = _verify(lenet5, tmp_path, [("m.onnx", "onnx", "fp32"),
                                        ("m.pt", "torchscript", "fp32")], real)
    verify.raise_on_failure(report)
    assert report.passed and report.batch_sizes == [1, 7, 64]
    for check in report.artifacts:
        assert check.random["max_abs"] <= 1e-5
        assert check.real["images"] == 500
        assert check.real["argmax_agreement"] >= 0.999
        # a trained model: the accuracy is real, and equal to eager's
        assert check.real["accuracy"] > 0.85
        assert check.real["accuracy"] == pytest.approx(check.real["eager_accuracy"], abs=0.002)
    assert report.real_images["eager_accuracy"] > 0.85
    table = verify.format_table(report.to_json())
    assert "m.onnx" in table and "PASS" in table


def test_perturbed_onnx_weight_fails_naming_file_and_metric(
    lenet5: torch.nn.Module, real: verify.RealImages, tmp_path: Path
) -> None:
    export_onnx(lenet5, (1, 32, 32), tmp_path / "m.onnx")
    perturb_onnx_weight(tmp_path / "m.onnx", factor=1.01)
    report = _verify(lenet5, tmp_path, [("m.onnx", "onnx", "fp32")], real)
    assert not report.passed
    with pytest.raises(VerificationError, match=r"m\.onnx \(onnx fp32\): random inputs: max abs"):
        verify.raise_on_failure(report)


def test_perturbed_torchscript_weight_fails(
    lenet5: torch.nn.Module, real: verify.RealImages, tmp_path: Path
) -> None:
    export_torchscript(lenet5, (1, 32, 32), tmp_path / "m.pt", {})
    module, _ = load_torchscript(tmp_path / "m.pt")
    with torch.no_grad():
        module.fc3.bias.add_(0.01)
    with quiet_jit():
        torch.jit.save(module, str(tmp_path / "m.pt"))
    report = _verify(lenet5, tmp_path, [("m.pt", "torchscript", "fp32")], real)
    assert not report.passed
    assert any("max abs error" in f for f in report.artifacts[0].failures)


def test_argmax_rule_catches_small_but_decisive_changes() -> None:
    """Errors far inside the fp32 tolerance that still flip the class of 0.5 % of real images fail:
    the argmax rule is checked on its own, not implied by the error bound."""
    n = 1000
    ref = np.zeros((n, 2), dtype=np.float32)
    ref[:, 0] = 1e-6
    flipped = ref.copy()
    flipped[:5] = ref[:5, ::-1]
    # Each real image carries its own index in its one pixel, so a runner can look its logits up.
    inputs = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    real = verify.RealImages(inputs, np.zeros(n, dtype=np.int64), "toy/test", "")

    def lookup(table: np.ndarray) -> verify.Runner:
        return lambda x: table[x[:, 0, 0, 0].astype(np.int64)]

    check = verify.check_artifact(
        lookup(flipped), lookup(ref), path="toy.onnx", format="onnx", precision="fp32",
        input_shape=(1, 1, 1), mean=[0.0], std=[1.0], real=real, eager_real=ref,
        batch_sizes=(1, 7))
    assert check.real["max_abs"] <= 1e-5
    assert check.real["argmax_agreement"] == pytest.approx(0.995)
    assert not check.passed
    assert check.failures[0] == "real images: argmax agreement 99.5000% < 99.9%"


def test_three_channel_model_without_dataset_says_so() -> None:
    real = verify.load_real_images("cifar10", "/nonexistent", (3, 32, 32), [0.5] * 3, [0.25] * 3)
    assert real.inputs is None
    assert "cifar10 unavailable" in real.note and "random inputs only" in real.note


def test_one_channel_model_falls_back_to_mnist_sample_and_says_so() -> None:
    real = verify.load_real_images("mnist", "/nonexistent", (1, 28, 28), MEAN, STD, max_images=10)
    assert real.inputs is not None and real.inputs.shape == (10, 1, 28, 28)
    assert real.dataset == "mnist-sample/test"
    assert "mnist unavailable" in real.note and "fell back" in real.note


def test_explicitly_requested_dataset_that_is_missing_is_an_error() -> None:
    with pytest.raises(DataError, match="mnist"):
        verify.load_real_images("mnist", "/nonexistent", (1, 28, 28), MEAN, STD, explicit=True)


def test_full_mnist_test_split_is_used_when_present(shared_data_dir: Path) -> None:
    real = verify.load_real_images("mnist", str(shared_data_dir), (1, 32, 32), MEAN, STD,
                                   max_images=100)
    assert real.dataset == "mnist/test" and real.inputs is not None
    assert real.inputs.shape == (100, 1, 32, 32)
