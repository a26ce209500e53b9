"""The run's curves.png and the measurement charts (matplotlib)."""

import numpy as np
from PIL import Image

from alexnet_pipeline import plot


def _records():
    out = []
    for epoch in range(1, 4):
        out.append({"kind": "train", "epoch": epoch, "step": 10 * epoch, "losses": [2.5 - 0.05 * i for i in range(10)]})
        out.append({"kind": "epoch", "epoch": epoch, "step": 10 * epoch, "train_loss": 2.2, "train_top1_error": 0.8,
                    "val_top1_error": 0.9 - 0.1 * epoch, "val_top5_error": 0.5 - 0.1 * epoch,
                    "lr": 0.01 / 10 ** (epoch // 3)})
    return out


def test_run_curves_are_a_picture(tmp_path):
    path = plot.plot_run(_records(), tmp_path / "curves.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and len(np.unique(np.asarray(im.convert("L")))) > 20
    assert plot.plot_run([], tmp_path / "none.png") is None


def test_step_losses_and_moving_mean():
    steps, losses = plot.step_losses(_records())
    assert steps == list(range(1, 31)) and len(losses) == 30 and losses[0] == 2.5
    assert plot.moving_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_learning_curves_and_bars(tmp_path):
    assert plot.plot_learning({"a": _records(), "b": _records()}, tmp_path / "l.png", reference=2.3).is_file()
    assert plot.plot_bars({"x": 3.0, "y": 1.0}, tmp_path / "b.png", "t", "images/s", highlight=("x",)).is_file()
