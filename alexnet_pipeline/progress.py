"""Progress of a long stage (prep's images and shards, --verify): a bar on a terminal; where stderr is not a
terminal (nohup, Slurm, CI logs) a line every `every` seconds (prep's --progress-every) with the stage,
done/total, the rate and the time left; and, at the end, the stage's count and time for the summary. Imports
nothing from the package."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A finished stage: what was done, how many, in how long."""

    name: str
    count: int
    unit: str
    seconds: float

    def line(self) -> str:
        rate = f", {self.count / self.seconds:,.1f} {self.unit}/s" if self.seconds > 0 and self.count else ""
        return f"stage {self.name}: {self.count:,} {self.unit} in {self.seconds:.1f} s{rate}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def mode(progress: bool | None) -> str:
    """'bar', 'lines' or 'off' for a progress option: None is a bar on a terminal and lines elsewhere."""
    if progress is None:
        return "bar" if sys.stderr.isatty() else "lines"
    return "bar" if progress else "off"


class Progress:
    """`update(n)` as work is done (or `to(done)`), `close()` at the end (returns the Stage)."""

    def __init__(self, name: str, total: int | None, unit: str, how: str = "lines", every: float = 30.0):
        self.name, self.total, self.unit, self.how, self.every = name, total, unit, how, every
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        if how == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit, smoothing=0.1, dynamic_ncols=True)

    def to(self, done: int) -> None:
        self.update(done - self.done)

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.how == "lines":
            now = time.perf_counter()
            if now - self._last >= self.every:
                self._last = now
                print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total:,}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        left = f", {_duration((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
        return f"{self.name}: {self.done:,}{of} {self.unit}{share}, {rate:,.0f} {self.unit}/s{left}"

    def close(self) -> Stage:
        if self._bar is not None:
            self._bar.close()
        return Stage(self.name, self.done, self.unit, time.perf_counter() - self.t0)
