"""--tensorboard (scalars, a grid of inputs, the model graph) and curves.png."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnctl.training.config import from_flags
from cnnctl.training.loop import train


def test_tensorboard_scalars_images_and_graph(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = from_flags("convnet", epochs=2, max_steps_per_epoch=3, progress=False,
                        tensorboard=True, out=str(tmp_path / "run"))
    train(config)
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr",
            "images_per_s"} <= set(tags["scalars"])
    assert [s.step for s in events.Scalars("accuracy/val")] == [1, 2]
    assert "inputs" in tags["images"]
    assert tags["graph"]
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
