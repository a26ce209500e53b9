"""Pictures of a run (RUN/curves.png) and of measurements, drawn with matplotlib.

matplotlib depends on `pillow`, so installing it after Pillow-SIMD would put plain Pillow back: `make install`
installs it first and Pillow-SIMD last (`alexnet-prep --version` says which PIL is in use).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_losses(records: list[dict]) -> tuple[list[int], list[float]]:
    """(step, loss) of every step in alexnet-train's log records."""
    steps: list[int] = []
    losses: list[float] = []
    for r in records:
        if r.get("kind") == "train":
            first = r["step"] - len(r["losses"]) + 1
            steps += range(first, r["step"] + 1)
            losses += r["losses"]
    return steps, losses


def plot_run(records: list[dict], path: Path) -> Path | None:
    """RUN/curves.png: training loss per step, train and validation error per epoch, learning rate."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps, losses = step_losses(records)
    if not epochs and not steps:
        return None
    fig, (ax_loss, ax_err, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    if steps:
        ax_loss.plot(steps, losses, color="0.75", lw=0.6, label="per step")
        ax_loss.plot(steps, moving_mean(losses, max(1, len(losses) // 50)), color="C0", label="moving mean")
    if epochs:
        ax_loss.plot([e["step"] for e in epochs], [e["train_loss"] for e in epochs], "o", color="C1",
                     label="epoch mean")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    ax_loss.legend(frameon=False)
    x = [e["epoch"] for e in epochs]
    for key, label, style in (("train_top1_error", "train top-1", "--"), ("val_top1_error", "val top-1", "-"),
                              ("val_top5_error", "val top-5", "-")):
        if epochs:
            ax_err.plot(x, [e[key] for e in epochs], style, marker="o", ms=3, label=label)
    ax_err.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_err.set(title="error", xlabel="epoch", ylim=(0, 1))
    ax_err.legend(frameon=False)
    if epochs:
        ax_lr.step(x, [e["lr"] for e in epochs], where="post", color="C3")
        ax_lr.set_yscale("log")
    ax_lr.set(title="learning rate (after each epoch)", xlabel="epoch")
    for ax in (ax_err, ax_lr):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_learning(runs: dict[str, list[dict]], path: Path, reference: float | None = None,
                  window: int = 50) -> Path:
    """Training loss per step of several runs (a `window`-step moving mean), e.g. two inits side by side;
    `reference` draws a horizontal line (ln of the number of classes: chance)."""
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for name, records in runs.items():
        steps, losses = step_losses(records)
        ax.plot(steps, losses, lw=0.4, alpha=0.35)
        ax.plot(steps, moving_mean(losses, window), color=ax.lines[-1].get_color(), label=name)
    if reference is not None:
        ax.axhline(reference, color="0.3", ls=":", lw=1, label=f"ln(classes) = {reference:.2f}")
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)")
    ax.legend(frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(values: dict[str, float], path: Path, title: str, xlabel: str, highlight: tuple[str, ...] = ()) -> Path:
    """A horizontal bar chart of named figures (e.g. images/s per feed), each bar labelled with its value."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2), constrained_layout=True)
    colours = ["C1" if n in highlight else "C0" for n in names]
    ax.barh(names, [values[n] for n in names], color=colours)
    ax.invert_yaxis()
    top = max(values.values())
    for i, n in enumerate(names):
        ax.text(values[n] + top * 0.01, i, f"{values[n]:,.0f}", va="center")
    ax.set(title=title, xlabel=xlabel, xlim=(0, top * 1.15 if math.isfinite(top) else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
