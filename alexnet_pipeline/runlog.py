"""The run's log: console lines, RUN/log.jsonl records and TensorBoard scalars, all from rank 0.

An interval's line says where the run is (epoch i/N, step), how it goes (loss, lr), how fast (the interval's
images/s, and the data wait: on a GPU the share of GPU time idle between steps, with the host's own time in the
loader beside it; clock.py) and how long the rest will take. The epoch's line and record carry the whole
epoch's images/s (its images over its wall time, logging included) and data wait.
"""

from __future__ import annotations

import importlib.util

from .rundir import RunDir


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class RunLog:
    """Rank 0 prints and records; the other ranks' calls do nothing."""

    def __init__(self, run: RunDir, main: bool):
        self.run, self.main = run, main
        self.writer = None
        if main and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.file("tensorboard")))

    def line(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def record(self, kind: str, step: int, **fields) -> None:
        """One JSONL line (and TensorBoard scalars for its float fields)."""
        self.run.append_log({"kind": kind, "step": step, **fields})
        if self.writer is not None:
            for k, v in fields.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def interval(self, *, epoch: int, epochs: int, step: int, done: int, per_epoch: int, losses: list[float],
                 lr: float, rate: float, wait: float, host_wait: float, step_time: float) -> None:
        """The line and record of one log interval; `done` batches of this epoch's `per_epoch` are taken and
        a step takes `step_time` seconds (this epoch's mean so far)."""
        epoch_eta = (per_epoch - done) * step_time
        run_eta = epoch_eta + (epochs - epoch) * per_epoch * step_time
        mean = sum(losses) / len(losses)
        self.record("train", step, epoch=epoch, loss=mean, losses=losses, lr=lr, interval_images_per_s=rate,
                    data_wait=wait, host_wait=host_wait, eta_epoch_s=epoch_eta, eta_run_s=run_eta)
        host = f" (host {host_wait:.0%})" if abs(host_wait - wait) > 0.005 else ""
        self.line(f"epoch {epoch}/{epochs} step {done}/{per_epoch} ({step} total)  loss {mean:.4f}  lr {lr:.2g}  "
                  f"{rate:,.0f} img/s  data wait {wait:.0%}{host}  ETA epoch {duration(epoch_eta)}, "
                  f"run {duration(run_eta)}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
