"""fp32 ONNX → int8 ONNX: static QDQ quantization calibrated on real training images.

onnxruntime's recipe: ``quant_pre_process`` (symbolic shape inference + graph optimisation, so the
quantizer sees fused Conv+ReLU patterns), then ``quantize_static`` with QuantFormat.QDQ, uint8
activations and per-channel int8 weights (the CPU execution provider's fast path on x86; see
onnxruntime's "quantize ONNX models" guide). Calibration ranges come from min/max over the batches
the reader yields, so they must be real images preprocessed exactly as at inference time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cnnctl.export.onnx import INPUT_NAME, check

log = logging.getLogger(__name__)

EXPORTER = "onnxruntime.quantization.quantize_static(QDQ, per_channel)"
CALIBRATION_BATCH = 32


class ArrayCalibrationReader:
    """onnxruntime's CalibrationDataReader over an in-memory N×C×H×W float32 array."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._images), self._batch_size):
            yield {INPUT_NAME: self._images[start:start + self._batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def quantize_int8(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], calibration: np.ndarray
) -> None:
    """Quantize ``src`` (fp32 ONNX) to ``dst`` using ``calibration`` (preprocessed float inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Subclass at call time: importing onnxruntime.quantization at module level costs ~1 s.
    class _Reader(ArrayCalibrationReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="cnnctl-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False)
        quantize_static(
            str(prepped), str(dst), _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    check(dst)
    log.info("int8: calibrated on %d images", len(calibration))
