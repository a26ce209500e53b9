"""The sample reader (reader.py) over numbered shards: each run's bytes and labels are the order's samples, the
padding marked, shards opened when first needed and let go after their last use in the epoch."""

import pytest
from conftest import numbered

from alexnet_pipeline import shards
from alexnet_pipeline.order import Order, Split
from alexnet_pipeline.reader import PAD_LABEL, SampleReader

SIZES = [3, 5, 1, 4, 2, 6]  # 21 samples


@pytest.fixture(scope="module")
def data(prepped, tmp_path_factory):
    return numbered(prepped, tmp_path_factory.mktemp("reader") / "data", SIZES)


def _reader(data, batch, rank=0, world=1, opened=None):
    entries = shards.load_manifest(data).splits["train"].shards
    paths = shards.shard_paths(data, "train")
    order = Order(tuple(e.samples for e in entries), seed=3, shuffle=True, window=2, streams=2)

    def path(i):
        if opened is not None:
            opened.append(i)
        return paths[i]

    return SampleReader(Split(order, batch * world, rank, world), entries, path), {
        s.key: s.jpeg for p in paths for s in shards.iter_samples(p.read_bytes())}


def test_each_run_holds_the_orders_samples_their_bytes_and_the_padding_marked(data):
    reader, by_key = _reader(data, batch=4)
    split = reader.split
    jpegs = set(by_key.values())
    for epoch in (0, 1):
        labels = []
        for step in range(split.steps):
            batch = reader.read(epoch, step, 1)
            samples, real = split.samples(epoch, split.positions(step, 1))
            want = [int(s) if r else PAD_LABEL for s, r in zip(samples, real, strict=True)]
            assert batch.labels.reshape(-1).tolist() == want  # numbered: a sample's label is its number
            assert all(bytes(j) in jpegs for j in batch.jpegs)
            assert set(batch.shards) == set(split.order.shard_of(samples).tolist())
            labels += [v for v in want if v != PAD_LABEL]
        assert sorted(labels) == list(range(sum(SIZES)))  # every sample once an epoch


def test_two_steps_a_run_read_what_the_two_steps_read_one_at_a_time(data):
    one, _ = _reader(data, batch=2)
    two, _ = _reader(data, batch=2)
    steps = one.split.steps
    singles = [one.read(0, s, 1).labels.reshape(-1).tolist() for s in range(steps)]
    pairs = [two.read(0, s, 2).labels.reshape(-1).tolist() for s in range(0, steps, 2)]
    flat = [v for pair in pairs for v in pair]
    assert flat[:sum(len(x) for x in singles)] == [v for x in singles for v in x]
    assert set(flat[sum(len(x) for x in singles):]) <= {PAD_LABEL}  # a last run past the epoch's end: padding


def test_a_shard_is_opened_once_an_epoch_and_let_go_after_its_last_use(data):
    opened = []
    reader, _ = _reader(data, batch=3, opened=opened)
    for epoch in (0, 1):  # the second epoch by its own schedule, not the first's
        uses, before = reader.split.uses(epoch), len(opened)
        for step in range(reader.split.steps):
            reader.read(epoch, step, 1)
            assert set(reader._open) == {i for i, (first, last) in uses.items() if first <= step < last}
        assert sorted(opened[before:]) == sorted(uses) and len(opened) - before == len(uses)


def test_ranks_read_disjoint_samples_that_together_are_the_split(data):
    seen = []
    for rank in range(3):
        reader, _ = _reader(data, batch=2, rank=rank, world=3)
        for step in range(reader.split.steps):
            seen += [v for v in reader.read(0, step, 1).labels.reshape(-1).tolist() if v != PAD_LABEL]
    assert sorted(seen) == list(range(sum(SIZES)))
