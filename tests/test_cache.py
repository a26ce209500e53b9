"""Shards in a store through the node cache (cache.py), against an S3 server on this machine: the same batches
as from the local copy, each shard fetched once per node per epoch, checked as it lands, evicted within a
byte budget by the reading schedule; changed objects named and never read."""

import collections
import os
import threading
import time

import pytest
import torch
from conftest import numbered, publish_to, shard_of

from alexnet_pipeline import cache, shards, storage
from alexnet_pipeline.pipeline import PAD_LABEL, ShardError, train_loader


def _exact(loader, epochs: int = 1):
    return [(y.tolist(), x.numpy().tobytes()) for _ in range(epochs) for x, y in loader]


def _copies(root):
    """The complete copies in a node cache: {split/name: bytes}. The cache's threads may evict a copy between
    the listing and its stat: such a copy is no longer held."""
    held = {}
    for p in root.rglob("*.tar"):
        try:
            if not p.name.startswith("."):
                held[f"{p.parent.name}/{p.name}"] = p.stat().st_size
        except FileNotFoundError:
            continue
    return held


@pytest.fixture
def remote(prepped, s3):
    publish_to(s3.loopback, prepped, s3.url("data"))
    return s3.url("data")


def test_a_loader_from_a_store_gives_the_local_loaders_batches_fetching_each_shard_once(prepped, remote, s3,
                                                                                        tmp_path):
    options = dict(batch_size=4, num_threads=1, cache_dir=tmp_path / "cache")
    want = _exact(train_loader(prepped, batch_size=4, num_threads=1), 2)
    loader = train_loader(remote, **options)
    assert _exact(loader, 2) == want
    names = [s.name for s in shards.load_manifest(prepped).splits["train"].shards]
    assert [s3.gets("data", "train", n) for n in names] == [1] * len(names)  # once, over two epochs
    assert loader.cache.downloads == len(names)
    again = train_loader(remote, **options)  # a later run on this node: the copies are trusted, nothing fetched
    assert _exact(again, 2) == want and again.cache.downloads == 0
    assert [s3.gets("data", "train", n) for n in names] == [1] * len(names)
    (cache.directory(tmp_path / "cache", remote) / "train" / names[0]).with_suffix(".idx").unlink()
    third = train_loader(remote, **options)
    assert _exact(third) == want[:len(third)] and third.cache.downloads == 1  # a copy without its index: fetched


def test_an_object_changed_in_the_store_since_the_manifest_is_named_and_never_read(prepped, s3, tmp_path):
    sizes = [3, 5, 1, 4, 2, 6]
    local = numbered(prepped, tmp_path / "numbered", sizes)
    publish_to(s3.loopback, local, s3.url("data"))
    options = dict(batch_size=2, num_threads=1, batches_per_run=1, lighting_sigma=0, streams=1, shuffle_window=1,
                   shard_shuffle=False, cache_dir=tmp_path / "cache")
    train_loader(s3.url("data"), **options).close()  # every shard cached once
    victim = 3  # read in the middle of the epoch
    key = f"{s3.bucket}/data/train/train-{victim:06d}.tar"
    data = bytearray(s3.fs().cat_file(key))
    data[-3000] ^= 0xFF  # same size, other bytes: a new ETag
    s3.fs().pipe(key, bytes(data))
    loader = train_loader(s3.url("data"), **options)
    seen = []
    with pytest.raises(ShardError, match=f"{s3.url('data', 'train', f'train-{victim:06d}.tar')}: its bytes differ "
                                         "from dataset.json"):
        for _, labels in loader:
            seen += labels[labels != PAD_LABEL].tolist()
    assert seen and victim not in {shard_of(v, sizes) for v in seen}  # batches before it came; none of it
    copies = _copies(tmp_path / "cache")
    assert f"train/train-{victim:06d}.tar" not in copies and len(copies) == len(sizes) - 1


@pytest.mark.parametrize("resize", [lambda data: data[:-512], lambda data: data + b"\0" * 512],
                         ids=["shorter", "longer"])
def test_an_object_resized_in_the_store_is_named_before_any_work(remote, s3, tmp_path, resize):
    key = f"{s3.bucket}/data/train/train-000001.tar"
    s3.fs().pipe(key, resize(s3.fs().cat_file(key)))
    with pytest.raises(ShardError, match=r"train-000001.tar: \d+ bytes in the store, dataset.json says \d+"):
        train_loader(remote, batch_size=4, num_threads=1, cache_dir=tmp_path / "cache")


def test_a_copy_without_its_record_or_a_download_left_by_a_killed_process_is_never_read(prepped, remote, tmp_path):
    """A file at a copy's name that the cache did not record (a half-written file, say) and a dead process's
    download are not read: the shard is fetched again, whole, and the batches are the local loader's. A dead
    process's reservation goes too: it would hold its bytes of the budget for good."""
    root = cache.directory(tmp_path / "cache", remote)
    (root / "train").mkdir(parents=True)
    (root / "train" / "train-000000.tar").write_bytes(b"\0" * 1000)
    (root / "train" / "train-000000.idx").write_text("v1.2 1\n")
    dead = root / "train" / ".train-000001.tar.part999999999-1"
    dead.write_bytes(b"partial")
    held = root / "train" / ".train-000002.tar.reserve999999999-1"  # room a dead fetch held in the budget
    with open(held, "wb") as f:
        f.truncate(10**12)
    loader = train_loader(remote, batch_size=4, num_threads=1, cache_dir=tmp_path / "cache")
    assert not dead.exists() and not held.exists()
    assert _exact(loader) == _exact(train_loader(prepped, batch_size=4, num_threads=1))
    assert loader.cache.downloads == len(shards.load_manifest(prepped).splits["train"].shards)


def test_a_cached_copy_that_rots_is_named_by_the_digest_removed_and_fetched_again(prepped, remote, tmp_path):
    """Bit rot in a copy keeps its size and time, which is all a later run's start compares: the background
    digest hashes the copies it trusts, names the rotten one, and removes it; the next run fetches it again."""
    options = dict(batch_size=4, num_threads=1, cache_dir=tmp_path / "cache")
    want = _exact(train_loader(remote, **options))
    copy = cache.directory(tmp_path / "cache", remote) / "train" / "train-000001.tar"
    st = copy.stat()
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    rotten = train_loader(remote, **options)
    assert rotten.cache.downloads == 0  # trusted at its start
    with pytest.raises(ShardError, match=r"train-000001.tar \(this node's copy of s3://.*/data/train/"
                                         r"train-000001.tar\): its bytes differ .* since it was fetched"):
        rotten.wait_for_digest()
    assert not copy.exists() and not copy.with_name(f".{copy.name}.json").exists()  # its record went with it
    again = train_loader(remote, **options)
    assert _exact(again) == want and again.cache.downloads == 1


def test_a_budget_of_a_quarter_of_the_split_serves_every_epoch_within_it(prepped, s3, tmp_path):
    """40 shards; the cache may hold 10. Every epoch is the local loader's, each shard is fetched at most once
    per epoch, and the directory never holds more than the budget. The default DALI runs (at least 256 images on
    the CPU: the whole epoch here) would keep every shard in use: they shrink until the budget holds them; the
    same runs asked for are refused in one line."""
    sizes = [3] * 40
    local = numbered(prepped, tmp_path / "numbered", sizes)
    publish_to(s3.loopback, local, s3.url("data"))
    quarter = sum(s.bytes for s in shards.load_manifest(local).splits["train"].shards) // 4
    options = dict(batch_size=2, num_threads=1, streams=1, shuffle_window=1, read_ahead=1)
    loader = train_loader(s3.url("data"), cache_dir=tmp_path / "cache", cache_size=str(quarter), **options)
    want = train_loader(local, **options)
    assert 1 <= loader.cfg.per_run < want.cfg.per_run == len(want)
    assert loader.cache.margin == loader.cfg.per_run  # a rank alone on its node keeps only the run it reads
    roomy = train_loader(s3.url("data"), cache_dir=tmp_path / "cache", cache_size=str(12 * quarter), **options)
    assert roomy.cfg.per_run == want.cfg.per_run  # a budget that holds the default runs (3 splits) keeps them
    roomy.close()
    with pytest.raises(ShardError, match="is less than this node reads at once"):
        train_loader(s3.url("data"), cache_dir=tmp_path / "cache", cache_size=str(quarter),
                     batches_per_run=want.cfg.per_run, **options)
    root, most, epochs = cache.directory(tmp_path / "cache", s3.url("data")), 0, 3
    for _ in range(epochs):
        for (x, y), (wx, wy) in zip(loader, want, strict=True):
            assert torch.equal(y, wy) and torch.equal(x, wx)
            most = max(most, sum(_copies(root).values()))
    assert 0 < most <= quarter
    loader.close()  # its fetches ahead ended
    # evicted and fetched again, never twice for one epoch's reading (the loader reads into the next epoch ahead)
    assert max(loader.cache.fetched.values()) == 1 and loader.cache.downloads > len(sizes)
    assert sum(s3.gets("data", "train", f"train-{i:06d}.tar") for i in range(len(sizes))) == loader.cache.downloads


def test_under_a_budget_smaller_than_the_read_ahead_the_reader_never_waits_for_a_copy_evicted_early(
        prepped, s3, tmp_path, monkeypatch):
    """With room for 14 shards of 40 and 16 wanted ahead, a copy fetched ahead is often evicted for one read
    sooner: it is fetched again ahead of the reader, not when the reader finds it gone."""
    sizes = [3] * 40
    local = numbered(prepped, tmp_path / "numbered", sizes)
    publish_to(s3.loopback, local, s3.url("data"))
    room = max(s.bytes for s in shards.load_manifest(local).splits["train"].shards) * 14
    urgent, task = [], cache.NodeCache._task
    monkeypatch.setattr(cache.NodeCache, "_task", lambda self, i, now: (urgent.append(now), task(self, i, now))[1])
    options = dict(batch_size=2, num_threads=1, batches_per_run=1, streams=1, shuffle_window=1, read_ahead=16)
    loader = train_loader(s3.url("data"), cache_dir=tmp_path / "cache", cache_size=str(room), **options)
    want = train_loader(local, **options)
    for epoch in range(3):
        if epoch == 1:
            urgent.clear()  # the first epoch's start may ask before the first fetch ahead
        for (x, y), (wx, wy) in zip(loader, want, strict=True):
            assert torch.equal(y, wy) and torch.equal(x, wx)
            time.sleep(0.005)  # a training step: the fetches ahead keep up with it
    loader.close()
    assert urgent.count(False) > len(sizes) and urgent.count(True) == 0


def test_a_budget_below_what_a_node_reads_at_once_is_one_line(remote, tmp_path):
    with pytest.raises(ShardError, match=r"--cache-size 1.0 KiB is less than this node reads at once from "
                                         r"s3://.*/data/train: .* shards open in the windows of its streams"):
        train_loader(remote, batch_size=4, num_threads=1, cache_dir=tmp_path / "cache", cache_size="1K")


def test_the_ranks_of_one_node_share_one_copy_of_each_shard(prepped, remote, s3, tmp_path, monkeypatch):
    """Two ranks of one node (LOCAL_WORLD_SIZE 2), one cache directory, in lockstep: each shard is fetched once
    for the node, whichever rank reads it, and both ranks get the local loaders' batches."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    options = dict(batch_size=2, num_threads=1, world_size=2, streams=1)  # one stream: both ranks read each shard
    ranks = [train_loader(remote, rank=r, cache_dir=tmp_path / "cache", **options) for r in range(2)]
    local = [train_loader(prepped, rank=r, **options) for r in range(2)]
    assert ranks[0].cache.node == (0, 1)
    for _ in range(2):
        for a, b, la, lb in zip(*ranks, *local, strict=True):
            assert torch.equal(a[0], la[0]) and torch.equal(b[0], lb[0])
    names = [s.name for s in shards.load_manifest(prepped).splits["train"].shards]
    assert [s3.gets("data", "train", n) for n in names] == [1] * len(names)
    assert ranks[0].cache.downloads + ranks[1].cache.downloads == len(names)


def test_a_store_down_for_a_while_mid_epoch_delays_the_epoch_and_one_gone_for_good_is_named(prepped, remote, s3,
                                                                                            tmp_path):
    from alexnet_pipeline.storage import StoreGone

    options = dict(batch_size=2, num_threads=1, streams=1, shuffle_window=1, read_ahead=1, cache_dir=tmp_path / "a",
                   storage_timeout=30)
    want = _exact(train_loader(prepped, **{k: v for k, v in options.items() if k not in ("cache_dir",
                                                                                          "storage_timeout")}))
    loader, got = train_loader(remote, **options), []
    for i, (x, y) in enumerate(loader):
        if i == 2:  # down for a second and a half, a few shards into the epoch
            s3.loopback.down = True
            threading.Timer(1.5, lambda: setattr(s3.loopback, "down", False)).start()
        got.append((y.tolist(), x.numpy().tobytes()))
    assert got == want
    gone = train_loader(remote, **{**options, "cache_dir": tmp_path / "b", "storage_timeout": 2})
    s3.loopback.down = True
    with pytest.raises(StoreGone, match=rf"{s3.url('data', 'train')}/train-\d+\.tar: cannot download .*gave up "
                                        r"after retrying for 2 s"):
        _exact(gone)
    s3.loopback.down = False  # back: a shard whose fetch gave up is fetched when it is asked for again
    for i in range(len(gone.cache.entries)):
        try:
            path = gone.cache.need(i)
        except StoreGone:  # a failure met while the store was down, reported once
            path = gone.cache.need(i)
        assert path.stat().st_size == gone.cache.entries[i].bytes
    gone.close()


def test_node_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cache.node_ranks(5, 8) == (4, 5, 6, 7) and cache.node_ranks(0, 8) == (0, 1, 2, 3)
    assert [cache.node_ranks(r, 8) for r in (3, 6)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    monkeypatch.setenv("WORLD_SIZE", "6")  # a last node with fewer ranks
    assert cache.node_ranks(5, 6) == (4, 5)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert cache.node_ranks(1, 2) == (1,)  # a loader not of torchrun's world: itself alone
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cache.node_ranks(5, 8) == (5,)
    assert os.environ["WORLD_SIZE"] == "8"


def test_two_nodes_with_their_own_caches_each_fetch_a_shard_at_most_once_and_mostly_their_own(prepped, s3,
                                                                                                tmp_path):
    """alexnet-train under two torchrun agents on this machine (two nodes of one rank, each with its own cache
    directory and its own way to the store, so its requests can be counted): two epochs over one bucket; no
    node fetches a shard twice, and with two streams (whose shards are the same every epoch) each node fetches
    its own half, but for the shard split at the streams' edge."""
    import subprocess
    import sys

    from alexnet_pipeline.loopback import Proxy, free_port

    sizes = [4] * 12
    data = numbered(prepped, tmp_path / "data", sizes)
    publish_to(s3.loopback, data, s3.url("data"))
    proxies = [Proxy(s3.loopback.moto_port) for _ in range(2)]
    for p in proxies:
        threading.Thread(target=p.serve_forever, daemon=True).start()
    port, agents = free_port(), []
    for node, proxy in enumerate(proxies):
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
             "alexnet_pipeline", "train", "--shards", s3.url("data"), "--out", str(tmp_path / f"run{node}"),
             "--cache-dir", str(tmp_path / f"cache{node}"), "--epochs", "2", "--device", "cpu", "--width", "0.0625",
             "--global-batch", "4", "--threads", "1", "--no-final-tencrop", "--streams", "2",
             "--shuffle-window", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for agent in agents:
        assert agent.wait(timeout=300) == 0, agent.stderr.read()[-3000:]
    fetched = [{path: n for (method, path), n in p.requests.items() if method == "GET" and path.endswith(".tar")
                and "/train/" in path} for p in proxies]
    for p in proxies:
        p.shutdown()
    assert all(n == 1 for node in fetched for n in node.values()), fetched  # at most once per node
    both = set(fetched[0]) & set(fetched[1])
    assert len(set(fetched[0]) | set(fetched[1])) == len(sizes) and len(both) <= 2, fetched


def _planned(margin: int, read_ahead: int = 1) -> cache.NodeCache:
    """A cache's plan alone (no store, no threads): 12 shards of 4 read in one stream, batch 2."""
    from alexnet_pipeline.order import Order, Split

    planned = cache.NodeCache.__new__(cache.NodeCache)
    planned.plan = Split(Order((4,) * 12, seed=2, window=1, streams=1), 2)
    planned.node, planned.margin, planned.read_ahead = (0,), margin, read_ahead
    planned._schedules, planned._position = {}, (0, 0)
    return planned


def test_a_shard_stays_in_use_for_the_margin_after_its_last_read_and_then_is_wanted_for_the_next_epoch():
    """Another rank of the node may lag `margin` steps (DALI's runs made ahead): a shard is neither evicted nor
    dropped from what is kept until `margin` steps after its last read here."""
    planned = _planned(margin=2)
    uses = planned.plan.uses(0, (0,))
    (i, (_, last)), (j, _) = list(uses.items())[:2]  # the first shard read, then the next
    nxt = next(iter(planned.plan.uses(1, (0,))))
    assert nxt != i, "pick a seed whose next epoch starts on another shard"
    for step in (last + 1, last + 2):
        assert planned._next_use(0, step)[i] == -1
        planned._position = (0, step)
        assert i in planned._wanted() and planned._serves(i) == 0  # a fetch now is for this epoch's reads
    k, (first_k, _) = list(uses.items())[-1]  # the shard read last: first read well after the margin
    # a shard to be read within the margin is in use already (a rank ahead may be reading it)
    assert planned._next_use(0, first_k - 2)[k] == -1 and planned._next_use(0, first_k - 3)[k] == first_k
    after = planned._next_use(0, last + 3)[i]
    assert after == planned.plan.steps + planned.plan.uses(1, (0,))[i][0]  # its next read: next epoch's
    planned._position = (0, last + 3)
    assert i not in planned._wanted() and j in planned._wanted()
    assert planned._serves(i) == 1 and planned._serves(j) == 0  # counted as the next epoch's fetch


class _HeldStore:
    """A store in memory whose downloads wait until `release` is set: what is in flight can be counted."""

    url = "mem://held"

    def __init__(self, entries):
        self.entries, self.release = entries, threading.Event()

    def child(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def stamps(self, split: str) -> dict:
        return {e.name: (e.bytes, "tag") for e in self.entries}

    def read_bytes(self, rel: str, what: str = "read") -> bytes:
        self.release.wait(30)
        return b"not the manifest's bytes"


def _entries(sizes) -> list:
    return [shards.ShardInfo(f"train-{i:06d}.tar", 4, size, "0" * 64) for i, size in enumerate(sizes)]


def test_no_more_fetches_ahead_are_in_flight_than_there_are_threads(tmp_path):
    """More would queue behind the threads, and a shard the reader needs now would wait behind them."""
    from alexnet_pipeline.order import Order, Split

    entries = _entries([1000] * 12)
    store = _HeldStore(entries)
    node = cache.NodeCache(store, "train", entries, tmp_path, Split(Order((4,) * 12, seed=2, window=1, streams=1), 2),
                           read_ahead=8, threads=2)
    try:
        seen = set()
        for _ in range(20):
            time.sleep(0.05)
            with node._cond:
                seen.add(len(node._inflight))
        assert seen == {2}, seen
    finally:
        store.release.set()
        node.close()


def _budgeted(tmp_path, sizes, budget, margin=1, threads=2) -> cache.NodeCache:
    """A cache's plan and budget over a directory (no store, no threads): shards of 4 in one stream, batch 2."""
    planned = _planned(margin)
    planned.entries, planned.budget, planned.threads = _entries(sizes), budget, threads
    planned.root, planned.dir, planned.split = tmp_path, tmp_path / "train", "train"
    planned.dir.mkdir(parents=True, exist_ok=True)
    planned.store = _HeldStore(planned.entries)
    planned._cond, planned._closed = threading.Condition(), False
    return planned


def test_the_budgets_floor_is_the_most_the_node_holds_at_once_margins_and_fetches_included(tmp_path):
    """Counted here step by step: a shard is held from `margin` steps before its first read to `margin`
    after its last, in this epoch and the next, plus one shard per fetching thread."""
    sizes, margin, threads = [1000 + 100 * i for i in range(12)], 2, 2
    planned = _budgeted(tmp_path, sizes, None, margin, threads)
    steps = planned.plan.steps
    held = collections.Counter()
    for e in (0, 1):
        for i, (first, last) in planned.plan.uses(e, (0,)).items():
            for t in range(e * steps + max(0, first - margin), e * steps + last + margin + 1):
                held[t] += sizes[i]
    need = max(held.values()) + threads * max(sizes)
    planned.budget = need
    planned._check_budget(0)  # exactly enough
    planned.budget = need - 1
    with pytest.raises(ShardError, match="is less than this node reads at once"):
        planned._check_budget(0)


def test_a_budget_takes_the_widest_margin_it_holds_and_refuses_when_it_holds_none(tmp_path):
    """The margins of the loader's run lengths, widest first: an ample budget keeps the widest (the default
    runs), a tighter one the first it holds (shorter runs), one below the narrowest is refused naming its need."""
    planned = _budgeted(tmp_path, [1000] * 12, None, margin=1)
    need = {}
    for m in (4, 2, 1):
        planned.margin = m
        need[m] = planned._need(0)[0]
    assert need[4] > need[2] > need[1]
    for budget, kept in ((need[4], 4), (need[4] - 1, 2), (need[2], 2), (need[1], 1)):
        planned.budget = budget
        planned._fit_budget(0, (4, 2, 1))
        assert planned.margin == kept, (budget, planned.margin)
    planned.budget = need[1] - 1
    with pytest.raises(ShardError, match=f"is less than this node reads at once from .*: {storage.human(need[1])}"):
        planned._fit_budget(0, (4, 2, 1))


def test_room_is_made_by_evicting_a_shard_read_later_never_one_in_use(tmp_path):
    planned = _budgeted(tmp_path, [1000] * 12, budget=1500, margin=1)
    planned._position = (0, 1)
    order = list(planned.plan.uses(0, (0,)))
    reading, wanted, last = order[0], order[1], order[-1]  # in use at step 1; in use within the margin; not soon
    assert planned._next_use(0, 1)[reading] == planned._next_use(0, 1)[wanted] == -1
    planned.path(reading).write_bytes(b"\0" * 1000)
    with pytest.raises(cache._NoRoom):  # the only copy is in use: no room now, and none made by evicting it
        planned._reserve(wanted, wait=False)
    assert planned.path(reading).exists()
    planned.path(reading).unlink()
    planned.path(last).write_bytes(b"\0" * 1000)
    reservation = planned._reserve(wanted, wait=False)
    assert reservation.stat().st_size == 1000 and not planned.path(last).exists()


def test_another_splits_copies_count_against_the_budget_and_go_first(tmp_path):
    planned = _budgeted(tmp_path, [1000] * 12, budget=2500, margin=1)
    planned._position = (0, 1)
    order = list(planned.plan.uses(0, (0,)))
    wanted, later = order[1], order[-1]
    (tmp_path / "val").mkdir()
    other = tmp_path / "val" / "val-000000.tar"
    other.write_bytes(b"\0" * 1000)
    planned.path(later).write_bytes(b"\0" * 1000)
    reservation = planned._reserve(wanted, wait=False)  # 3,000 bytes with it: one copy must go, val's first
    assert reservation.stat().st_size == 1000 and not other.exists() and planned.path(later).exists()


def test_the_prefetcher_wants_the_shards_in_use_and_read_ahead_more_in_reading_order():
    planned = _planned(margin=0, read_ahead=3)
    order = list(planned.plan.uses(0, (0,)))
    assert planned._wanted() == order[:4]  # at step 0: the one in use (one stream), then three ahead
    planned._position = (0, planned.plan.steps - 1)  # the last step: the rest of the epoch, then the next's
    assert planned._wanted() == [order[-1], *list(planned.plan.uses(1, (0,)))[:3]]
