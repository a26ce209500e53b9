"""The end-of-run PNG: training loss and error curves per epoch, drawn with Pillow alone.

Not matplotlib: installing it (or anything that depends on `pillow`) silently replaces Pillow-SIMD, which
the baseline and the prep tool rely on.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series: dict[str, tuple[list, list]]) -> None:
    """Line chart of `series` {name: (xs, ys)} inside box (left, top, right, bottom), with axes and legend."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 30, right - 10, bottom - 35  # the plotting area
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1)

    def at(x, y):
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    draw.text((left + 60, top + 8), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for v in _ticks(ymin, ymax):
        _, y = at(xmin, v)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((left + 5, y - 6), f"{v:.3g}", fill="black")
    for v in _ticks(xmin, xmax):
        x, _ = at(v, ymin)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 8, y1 + 8), f"{v:.0f}", fill="black")
    draw.text(((x0 + x1) // 2 - 15, bottom - 18), "epoch", fill="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [at(x, y) for x, y in zip(xs, ys)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((x1 - 150, y0 + 8 + 14 * i), name, fill=colour)


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Write loss and error curves of alexnet-train's per-epoch history to `path` (PNG); None if empty."""
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    im = Image.new("RGB", (1100, 420), "white")
    draw = ImageDraw.Draw(im)
    _panel(draw, (0, 0, 550, 420), "training loss", {"train loss": (epochs, [h["train_loss"] for h in history])})
    errors = {name: (epochs, [h[key] for h in history]) for name, key in
              (("train top-1", "train_top1_error"), ("val top-1", "val_top1_error"), ("val top-5", "val_top5_error"))}
    _panel(draw, (550, 0, 1100, 420), "error", errors)
    im.save(path)
    return Path(path)
