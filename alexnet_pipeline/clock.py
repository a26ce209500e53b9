"""Where a training interval's time went: did the device wait for data?

On a GPU the step is asynchronous (a CUDA graph replay returns at once, and the host runs up to ~25 steps
ahead), so the host's time inside the loader's `next()` says nothing about the GPU: the host may wait for
DALI while the GPU is still busy with earlier steps. The data wait that matters is the GPU's idle time between
steps: a CUDA event is recorded on the stream just before and just after each step, and at the interval's host
sync (the one the trainer already makes to read the losses) the gaps between one step's end and the next one's
start are summed, as a share of the GPU time the interval spanned. The host's own time in `next()` is kept
beside it (`host_wait`). On the CPU the host is the device, and both are the host's time in `next()`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepClock:
    """`with clock.waiting(): batch = next(it)`, `with clock.stepping(): step(batch)`, then after the host sync
    `clock.interval()` -> (data_wait, host_wait), shares of the interval; `clock.epoch()` the same over the
    epoch so far."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        self._epoch = [0.0, 0.0, 0.0, 0.0]  # idle, span, host wait, wall
        self._start_interval()

    def _start_interval(self) -> None:
        self._events: list = []
        self._host = 0.0
        self._t0 = time.perf_counter()

    @contextmanager
    def waiting(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host += time.perf_counter() - t0

    @contextmanager
    def stepping(self):
        if not self.gpu:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    def interval(self) -> tuple[float, float]:
        """(data wait, host wait) of the interval just ended, as shares; call after the host sync (the events
        are then complete, so reading them costs no wait)."""
        wall = time.perf_counter() - self._t0
        host = self._host
        if self.gpu and self._events:
            # the gaps inside the interval; the one before its first step holds the trainer's own sync and log
            # line, which are no wait for data
            gaps = zip(self._events[:-1], self._events[1:], strict=True)  # each step and the next
            idle = sum(end.elapsed_time(start) for (_, end), (start, _) in gaps) / 1e3
            span = self._events[0][0].elapsed_time(self._events[-1][1]) / 1e3
        else:
            idle, span = host, wall
        for k, v in enumerate((idle, span, host, wall)):
            self._epoch[k] += v
        self._start_interval()
        return idle / max(span, 1e-9), host / max(wall, 1e-9)

    def epoch(self) -> tuple[float, float]:
        """(data wait, host wait) over the epoch's intervals so far; starts a new epoch."""
        idle, span, host, wall = self._epoch
        self._epoch = [0.0, 0.0, 0.0, 0.0]
        return idle / max(span, 1e-9), host / max(wall, 1e-9)
