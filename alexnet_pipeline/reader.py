"""The sample reader: the JPEG bytes and labels of each DALI run, in the order order.py gives, straight from
whole shards mapped into memory (on a local disk, or in the node cache). What DALI gets is views into those
maps: no copy on the host, and the pages are read by DALI's threads as they decode, not by this one.

A shard is mapped when one of this rank's batches first needs it and let go after its last use in the epoch
(its index read once per loader). Padding positions carry label PAD_LABEL. Imports numpy only; pipeline.py
hands the views to DALI's external source.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .order import Split
from .shards import ShardInfo, read_index

PAD_LABEL = -100


class Mapped:
    """One shard's bytes mapped read-only, as a uint8 array (views of it keep the map alive)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


@dataclass
class Batch:
    """A run's samples: JPEG views, labels [n, 1] (PAD_LABEL for padding) and the shards they came from."""

    jpegs: list[np.ndarray]
    labels: np.ndarray
    shards: list[int]


class SampleReader:
    """The samples of this rank's batches. `path(i)` gives shard i's file when it is needed (a local path, or
    the cached copy, waited for); `entries` are the split's ShardInfo in manifest order."""

    def __init__(self, split: Split, entries: list[ShardInfo], path: Callable[[int], Path]):
        self.split, self.entries, self.path = split, entries, path
        self.order = split.order
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # starts, ends, labels: once
        self._open: dict[int, Mapped] = {}
        self._epoch: int | None = None
        self._last: dict[int, int] = {}  # shard -> this rank's last step using it in self._epoch

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._last = {i: last for i, (_, last) in self.split.uses(epoch).items()}
        for i in [i for i in self._open if i not in self._last]:
            del self._open[i]  # not read this epoch
        # the next epoch's order, drawn meanwhile (numpy's sorts leave the GIL): an ImageNet epoch's takes
        # about half a second, which the first batch of the next epoch would otherwise wait for
        threading.Thread(target=self.split.uses, args=(epoch + 1,), daemon=True, name="next-order").start()

    def _mapped(self, i: int) -> Mapped:
        m = self._open.get(i)
        if m is None:
            path = self.path(i)
            m = self._open[i] = Mapped(path)
            if i not in self._tables:
                index = read_index(path.with_suffix(".idx"), self.entries[i])
                self._tables[i] = (index.jpg_offsets, index.jpg_offsets + index.jpg_sizes, index.labels(m.data))
        return m

    def read(self, epoch: int, step: int, steps: int) -> Batch:
        """The samples of `steps` steps of `epoch` from `step` for this rank (steps past the epoch's end are
        padding too)."""
        if epoch != self._epoch:
            self._start_epoch(epoch)
        samples, real = self.split.samples(epoch, self.split.positions(step, steps))
        shard = self.order.shard_of(samples)
        local = samples - self.order.starts[shard]
        jpegs: list = [None] * len(samples)
        labels = np.empty(len(samples), np.int64)
        # shard by shard (a run reads a few): the offsets gathered at once, then a view per sample
        by_shard = np.argsort(shard, kind="stable")
        used = []
        for where in np.split(by_shard, np.flatnonzero(np.diff(shard[by_shard])) + 1):
            i = int(shard[where[0]])
            used.append(i)
            data = self._mapped(i).data
            starts, ends, shard_labels = self._tables[i]
            k = local[where]
            labels[where] = shard_labels[k]
            for at, a, b in zip(where.tolist(), starts[k].tolist(), ends[k].tolist(), strict=True):
                jpegs[at] = data[a:b]
        labels[~real] = PAD_LABEL
        # let go of shards this rank is done with this epoch (views handed out keep their map alive)
        end = step + steps - 1
        for i in [i for i in self._open if self._last.get(i, -1) <= end]:
            del self._open[i]
        return Batch(jpegs, labels.reshape(-1, 1), used)
