"""The sample order: which sample every rank reads at every step of every epoch, a pure function of the seed,
the epoch, the split's shard sizes and three options. No library's reader decides it, so a release cannot
change it, a checkpoint needs only (epoch, step), and a run resumes at the same place on any number of ranks.

The order, built in three moves:

1. Streams (once, from the seed): the shards in a random order, cut into `streams` runs of equal numbers of
   samples (a shard at an edge is split between two streams). They are read side by side, one sample of each
   in turn: step s of an epoch takes the positions [s*G, (s+1)*G) of the global batch G, and rank r of M takes
   every M-th of them (r, r+M, ...), so position p is always stream p % streams. When M divides `streams` and
   `streams` divides G, rank r reads only the streams c with c % M == r, every epoch: the ranks of a node read
   their own 1/nodes of the shards, and a node cache holding that share fetches each shard once for the run.
2. Shards: within each stream, a new order every epoch (`shuffle`; off: the prepared order, which prep
   shuffled once, and no mixing).
3. Samples: mixed within each window of `window` consecutive shards of its stream. A window is what a reader
   holds open, so it bounds what a node must have at hand. `window` 0 is one permutation of the whole split
   (cut into the streams afterwards): the most mixing, for local disks.

What a run has consumed after s steps is the positions [0, s*G), whatever the number of ranks, so a run saved
on N ranks continues on M ranks (the same G) with every sample of the epoch seen exactly once. The last step
is padded to a whole global batch with the epoch's last sample; the loaders label those positions PAD_LABEL.

Randomness comes from Philox's raw output (numpy guarantees the bit generators' streams across releases, not
its shuffling algorithms), sorted: the permutations are ours. Imports numpy only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

_SHARDS, _SAMPLES, _STREAMS = 1, 2, 3  # Philox key words: the shards' order, the samples', the streams' shards


def _keys(seed: int, epoch: int, what: int, n: int) -> np.ndarray:
    """n random 64-bit words, a pure function of (seed, epoch, what)."""
    bits = np.random.Philox(key=[int(seed), (int(epoch) << 8) | what])
    return bits.random_raw(n)


@dataclass(frozen=True)
class Order:
    """The order options of a split: its shard sizes (manifest order) and how an epoch is drawn from them."""

    sizes: tuple[int, ...]
    seed: int = 0
    shuffle: bool = True
    window: int = 4
    streams: int = 16

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError("an order needs shards of at least one sample each")
        if self.window < 0 or self.streams < 1:
            raise ValueError("window must be >= 0 and streams >= 1")

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """The global index of each shard's first sample, and the total at the end (len(sizes) + 1)."""
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, samples: np.ndarray) -> np.ndarray:
        """The shard (index into sizes) of each global sample index."""
        return np.searchsorted(self.starts, samples, side="right") - 1

    @functools.cached_property
    def _streams(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which samples each stream holds, for every epoch: the shards in an order drawn once from the seed,
        cut into `streams` runs of samples. (samples in that order, their stream, the streams' bounds.) The
        first n % streams streams are one sample longer, so that position p of an epoch is always stream
        p % streams, the last (partial) row included."""
        n, c = self.n, min(self.streams, self.n)
        lengths = np.full(c, n // c, np.int64)
        lengths[:n % c] += 1
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        index = np.arange(n, dtype=np.int64)
        shards = np.argsort(_keys(self.seed, 0, _STREAMS, len(self.sizes)), kind="stable") if self.shuffle \
            else np.arange(len(self.sizes))
        counts = np.asarray(self.sizes, np.int64)[shards]
        # the samples of the shards in that order: each shard's start, plus 0..size-1
        samples = np.repeat(self.starts[shards], counts) + index - np.repeat(np.cumsum(counts) - counts, counts)
        return samples, np.searchsorted(bounds, index, side="right") - 1, bounds

    @functools.lru_cache(maxsize=4)  # noqa: B019 (frozen and hashable; each epoch is asked for many times)
    def of_epoch(self, epoch: int) -> np.ndarray:
        """The epoch's order: global sample indices by position."""
        samples, stream, bounds = self._streams
        n = self.n
        if self.shuffle and not self.window:  # one permutation of the whole split, cut into streams
            samples = samples[np.argsort(_keys(self.seed, epoch, _SAMPLES, n), kind="stable")]
        elif self.shuffle:
            shard = self.shard_of(samples)
            # each stream's shards (its part of a shard at its edge) in a new order, then windows of them mixed
            piece = np.lexsort((shard, _keys(self.seed, epoch, _SHARDS, len(self.sizes))[shard], stream))
            samples, shard, stream = samples[piece], shard[piece], stream[piece]
            new = np.concatenate([[True], (shard[1:] != shard[:-1]) | (stream[1:] != stream[:-1])])
            rank = np.cumsum(new) - 1  # the piece's place in the epoch's sequence
            first = rank[np.concatenate([[0], bounds[1:-1]])]  # each stream's first piece
            window = (rank - first[stream]) // self.window
            mixed = np.lexsort((_keys(self.seed, epoch, _SAMPLES, n), window, stream))
            samples, stream = samples[mixed], stream[mixed]
        item = np.arange(n, dtype=np.int64) - bounds[stream]
        return samples[np.lexsort((stream, item))]  # item 0 of every stream, then item 1, ...


@dataclass(frozen=True)
class Split:
    """How one epoch's order is cut into steps and ranks: global batch `batch` (= per-rank batch x world)."""

    order: Order
    batch: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1 or self.batch % self.world or not 0 <= self.rank < self.world:
            raise ValueError(f"global batch {self.batch} over {self.world} ranks (rank {self.rank})")

    @property
    def steps(self) -> int:
        """Steps per epoch: every rank yields this many batches, the last padded."""
        return math.ceil(self.order.n / self.batch)

    @property
    def per_rank(self) -> int:
        return self.batch // self.world

    def positions(self, step: int, steps: int = 1, ranks: tuple[int, ...] | None = None) -> np.ndarray:
        """The epoch positions of `steps` steps from `step`, for this rank (or `ranks`): for each step in turn,
        positions step*batch + r + world*j of each rank r, j < per_rank."""
        ranks = (self.rank,) if ranks is None else ranks
        j = np.arange(self.per_rank, dtype=np.int64) * self.world
        s = np.arange(step, step + steps, dtype=np.int64)[:, None, None] * self.batch
        return (s + np.asarray(ranks, np.int64)[None, :, None] + j[None, None, :]).reshape(-1)

    def samples(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global sample indices, whether each position is real) of `positions` in `epoch`: positions past
        the end are the padding, filled with the epoch's last sample (whose shard is open at the end)."""
        order = self.order.of_epoch(epoch)
        real = positions < self.order.n
        return order[np.where(real, positions, self.order.n - 1)], real

    @functools.lru_cache(maxsize=8)  # noqa: B019 (frozen and hashable: the reader, digest and cache all ask)
    def uses(self, epoch: int, ranks: tuple[int, ...] | None = None) -> dict[int, tuple[int, int]]:
        """{shard: (first step, last step)} that `ranks` (default: this rank) read it in `epoch`, in the order
        of first use (ties by shard): the reading schedule a cache fetches by and evicts by."""
        positions = self.positions(0, self.steps, ranks)
        shard = self.order.shard_of(self.samples(epoch, positions)[0])
        step = positions // self.batch
        first, last = np.full(len(self.order.sizes), -1), np.full(len(self.order.sizes), -1)
        # positions are in step order: the last write of a shard's first/last use wins
        first[shard[::-1]] = step[::-1]
        last[shard] = step
        used = np.flatnonzero(first >= 0)
        used = used[np.lexsort((used, first[used]))]
        return {int(i): (int(first[i]), int(last[i])) for i in used}
