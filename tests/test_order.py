"""The sample order (order.py): a pure function of (seed, epoch, shard sizes, options), every sample once per
epoch, windows that bound what a stream holds open, and steps that mean the same on any number of ranks."""

import numpy as np
import pytest

from alexnet_pipeline.order import Order, Split

SIZES = (7, 5, 9, 3, 8, 6, 7, 4, 9, 2)  # unequal shards, like a split's last one


def _shard(order: Order, samples) -> np.ndarray:
    return order.shard_of(np.asarray(samples))


def test_an_epochs_order_is_every_sample_once_and_a_pure_function_of_its_inputs():
    order = Order(SIZES, seed=3, window=2, streams=3)
    first = order.of_epoch(0)
    assert sorted(first.tolist()) == list(range(sum(SIZES)))
    assert np.array_equal(Order(SIZES, seed=3, window=2, streams=3).of_epoch(0), first)  # recomputed, the same
    for other in (order.of_epoch(1), Order(SIZES, seed=4, window=2, streams=3).of_epoch(0)):
        assert not np.array_equal(other, first) and sorted(other.tolist()) == sorted(first.tolist())
    for window in (4, 0):  # shuffle off means the prepared order, whatever the window says
        fixed = Order(SIZES, shuffle=False, window=window, streams=1)
        assert np.array_equal(fixed.of_epoch(0), fixed.of_epoch(5))
        assert fixed.of_epoch(0).tolist() == list(range(sum(SIZES)))


def test_the_order_is_pinned_so_that_no_release_changes_a_checkpoints_meaning():
    """A checkpoint says (epoch, step): the samples behind it must never change. These are the values of the
    first release of this order; a change here breaks every saved run's resume."""
    order = Order((3, 5, 1, 4, 2, 6), seed=0, window=2, streams=2)
    assert order.of_epoch(1).tolist()[:12] == PINNED


PINNED = [13, 6, 17, 4, 19, 7, 16, 8, 20, 3, 14, 5]


def _open_at_most(shards_read: list[int]) -> int:
    """The most shards 'open' at once in a reading sequence: from each shard's first to its last read."""
    first, last = {}, {}
    for t, s in enumerate(shards_read):
        first.setdefault(s, t)
        last[s] = t
    return max(sum(1 for s in first if first[s] <= t <= last[s]) for t in range(len(shards_read)))


@pytest.mark.parametrize("window", [1, 2, 3])
def test_each_stream_holds_at_most_a_window_of_shards_open(window):
    """Within a stream (every streams-th position), the samples come a window of shards at a time, so a
    reader holds at most `window` shards open per stream (one more where a stream's edge splits a shard)."""
    sizes = (20,) * 12
    order = Order(sizes, seed=1, window=window, streams=2)
    for epoch in range(3):
        by_position = order.of_epoch(epoch)
        for stream in range(2):
            read = _shard(order, by_position[stream::2]).tolist()
            assert _open_at_most(read) <= window + 1, (epoch, stream)
        whole = _shard(order, by_position).tolist()
        assert len(set(whole[:40])) > window  # the two streams read different windows side by side


def test_window_zero_is_a_global_permutation():
    sizes = (50,) * 20
    mixed = Order(sizes, seed=2, window=0, streams=1).of_epoch(0)
    first_tenth = set(_shard(Order(sizes), mixed[:100]).tolist())
    assert len(first_tenth) >= 15  # a window of shards would give a handful; the whole split gives most
    windowed = Order(sizes, seed=2, window=2, streams=1).of_epoch(0)
    assert len(set(_shard(Order(sizes), windowed[:100]).tolist())) == 2


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 12])
def test_after_s_steps_the_same_positions_are_consumed_on_any_number_of_ranks(world):
    order = Order(SIZES, seed=0, window=2, streams=4)
    split = [Split(order, 12, r, world) for r in range(world)]
    assert {s.steps for s in split} == {-(-sum(SIZES) // 12)}
    for steps in range(split[0].steps + 1):
        taken = np.concatenate([s.positions(0, steps) for s in split]) if steps else np.array([], int)
        assert sorted(taken.tolist()) == list(range(steps * 12))  # disjoint over the ranks, a prefix of the epoch


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (3, 2), (1, 4)])
def test_a_run_resumed_on_another_number_of_ranks_sees_every_sample_once(before, after):
    order = Order(SIZES, seed=5, window=3, streams=6)
    first, second = [Split(order, 12, r, before) for r in range(before)], [Split(order, 12, r, after)
                                                                           for r in range(after)]
    cut = 3  # steps taken before the stop
    seen = []
    for splits, start, steps in ((first, 0, cut), (second, cut, first[0].steps - cut)):
        for s in splits:
            samples, real = s.samples(2, s.positions(start, steps))
            seen += samples[real].tolist()
    assert sorted(seen) == list(range(sum(SIZES)))


def test_the_last_step_is_padded_with_the_epochs_last_sample():
    order = Order(SIZES, seed=0)
    for rank in (0, 1):  # rank 0 holds position n itself, the first padding
        split = Split(order, 16, rank, 2)
        samples, real = split.samples(0, split.positions(split.steps - 1))
        assert not real.all() and (samples[~real] == order.of_epoch(0)[-1]).all()
        assert real.sum() == len([p for p in range((split.steps - 1) * 16 + rank, split.steps * 16, 2)
                                  if p < order.n])


def test_ranks_that_divide_the_streams_read_their_own_streams_and_so_mostly_their_own_shards():
    """16 streams, 4 ranks on 2 nodes of 2: a node's ranks read 8 streams of their own; the nodes share only
    the shards at their streams' edges (and the padding's)."""
    sizes = (100,) * 64
    order = Order(sizes, seed=0, window=2, streams=16)
    split = Split(order, 64, 0, 4)
    nodes = [set(split.uses(0, ranks=(0, 1))), set(split.uses(0, ranks=(2, 3)))]
    assert nodes[0] | nodes[1] == set(range(64))
    assert len(nodes[0] & nodes[1]) <= 4 and len(nodes[0]) < 40
    positions = np.arange(order.n)
    by_rank = {r: set((positions[positions % 4 == r] % 16).tolist()) for r in range(4)}
    assert by_rank == {r: {c for c in range(16) if c % 4 == r} for r in range(4)}  # the streams of each rank


def test_uses_are_each_shards_first_and_last_step_in_reading_order():
    order = Order(SIZES, seed=1, window=2, streams=3)
    split = Split(order, 6, 1, 3)
    uses = split.uses(4)
    brute: dict[int, list[int]] = {}
    for step in range(split.steps):
        samples, _ = split.samples(4, split.positions(step))
        for shard in _shard(order, samples).tolist():
            brute.setdefault(shard, [step, step])[1] = step
    assert uses == {k: tuple(v) for k, v in brute.items()}
    firsts = [first for first, _ in uses.values()]
    assert firsts == sorted(firsts)


def test_a_streams_samples_are_the_same_every_epoch_so_a_nodes_shards_are_too():
    """Each stream holds the same samples every epoch, in a new order; with window 0 (one permutation of the
    whole split) they change."""
    order = Order(SIZES, seed=4, window=2, streams=4)
    members = [[set(order.of_epoch(e)[k::4].tolist()) for k in range(4)] for e in range(3)]
    assert members[0] == members[1] == members[2]
    assert not np.array_equal(order.of_epoch(0), order.of_epoch(1))
    split = Split(order, 12, 0, 2)  # 60 samples: no padding, whose sample changes every epoch
    assert set(split.uses(0)) == set(split.uses(5))
    whole = Order(SIZES, seed=4, window=0, streams=4)
    assert [set(whole.of_epoch(0)[k::4].tolist()) for k in range(4)] != [set(whole.of_epoch(1)[k::4].tolist())
                                                                         for k in range(4)]
    # which shards a stream holds is the seed's too: another seed, other streams (another node's shards)
    other = Order(SIZES, seed=5, window=2, streams=4)
    assert [set(other.of_epoch(0)[k::4].tolist()) for k in range(4)] != members[0]


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_its_world_has_no_part(rank, world):
    with pytest.raises(ValueError):
        Split(Order(SIZES), 2 * max(world, 1), rank, world)


@pytest.mark.parametrize("sizes", [(), (3, 0, 2), (4, -1)])
def test_an_order_over_no_shards_or_an_empty_one_is_refused(sizes):
    """A shard of no samples would have no sample to start its stream's turn with: refused when the order is
    made, not met mid-epoch."""
    with pytest.raises(ValueError, match="at least one sample each"):
        Order(sizes)
