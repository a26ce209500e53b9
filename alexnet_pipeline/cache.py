"""The node cache: whole shards of a remote split, fetched ahead of the reader in the order this node's ranks
read them, into a local directory that the ranks of one node share.

- One request per shard; its sha256 checked against the manifest and its index made from its bytes in
  memory, then written to a temporary file and renamed into place: a half-downloaded or changed object is
  never read. Beside each copy, its record (`.NAME.json`: the copy's size, time and sha256, and the remote
  object's size and ETag when it was fetched) is the stat cache of the copies: a later run trusts a copy
  while its size and time and the object's (size, ETag) in the store are the same, and the bit-rot digest
  hashes such copies in the background as it does local shards; a copy whose object changed is dropped and
  fetched again.
- A lock per shard (flock): the ranks of a node each ask for what they read, and a shard another rank is
  fetching is waited for, not fetched twice.
- `budget` bounds the bytes of the directory. Eviction follows Belady's rule on the node's reading schedule
  (order.Split.uses over the node's ranks, LOCAL_WORLD_SIZE): a shard whose next use is later than the one
  to fetch goes first, shards of another split before any, and never one in use. A budget below what the
  node reads at once (the open windows of its streams, plus the fetches in flight) is refused at start in
  one line, so the rule can always make room.

Why not fsspec's own caches: `filecache::` and `simplecache::` keep whole files but fetch when a file is
opened, in the reader's thread; they know no reading order (so cannot fetch ahead), no byte budget, no
sha256 against a manifest and no lock shared by several processes.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import files
from .order import Split
from .shards import MANIFEST, ShardError, ShardInfo, index_of
from .storage import Store, human

NOT_SOON, OTHER_SPLIT = float(2**62), float(2**63)  # next-use keys of eviction: not read soon; another split's


def directory(root: Path, url: str) -> Path:
    """The cache directory of one dataset under `root`: a directory per URL."""
    return Path(root) / hashlib.sha256(url.encode()).hexdigest()[:16]


def node_ranks(rank: int, world: int) -> tuple[int, ...]:
    """The ranks on this rank's machine, as torchrun numbers them (LOCAL_WORLD_SIZE consecutive ranks per
    node); just this rank when torchrun did not say."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1 or int(os.environ.get("WORLD_SIZE", "1")) != world:
        return (rank,)
    first = rank - rank % local
    return tuple(range(first, min(first + local, world)))


class NodeCache:
    """The cached copies of `split` (its `entries`, manifest order) of the dataset at `store`, under `root`."""

    def __init__(self, store: Store, split: str, entries: list[ShardInfo], root: Path, plan: Split,
                 budget: int | None = None, read_ahead: int = 16, threads: int = 4, first_epoch: int = 0,
                 margin: int = 3, fallback_margins: tuple[int, ...] = ()):
        self.store, self.split, self.entries, self.plan = store, split, entries, plan
        self.root, self.dir = Path(root), Path(root) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write(self.root / "SOURCE", f"{store.url}\n".encode(), durable=False)
        # margin: the steps another rank of the node may lag behind this one (DALI's runs made ahead): a shard
        # in use from `margin` steps before its first read to `margin` after its last is never evicted. Under a
        # budget too small for it, the first of fallback_margins (shorter runs the loader may make) that fits.
        self.budget, self.read_ahead, self.threads, self.margin = budget, read_ahead, min(threads, read_ahead), margin
        self.node = node_ranks(plan.rank, plan.world)
        self._cond = threading.Condition()
        self._present: set[int] = set()
        self._inflight: set[int] = set()
        self._failed: dict[int, BaseException] = {}
        self._position = (first_epoch, 0)
        self._no_room_at: tuple[int, int] | None = None
        self._schedules: dict[tuple[int, tuple[int, ...]], dict[int, tuple[int, int]]] = {}
        self.fetched: collections.Counter[tuple[int, int]] = collections.Counter()  # (epoch read in, shard)
        self._sweep()
        self.trusted = self._validate(store.stamps(split))  # copies found intact from an earlier run
        self._present |= self.trusted
        if budget is not None:
            self._fit_budget(first_epoch, (margin, *fallback_margins))
        self._closed = False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-fetch")
        self._thread = threading.Thread(target=self._prefetch, daemon=True, name="shard-prefetch")
        self._thread.start()

    # ---- the copies on disk --------------------------------------------------------------------------------

    def path(self, i: int) -> Path:
        return self.dir / self.entries[i].name

    def url(self, i: int) -> str:
        return self.store.child(self.split, self.entries[i].name)

    def _validate(self, stamps: dict[str, tuple[int, str]]) -> set[int]:
        """Name objects missing or resized in the store (before any work); return the copies that are still the
        manifest's bytes of the store's current objects, dropping the others."""
        self.stamps, found = stamps, set()
        for i, info in enumerate(self.entries):
            remote = stamps.get(info.name)
            if remote is None:
                raise ShardError(f"{self.url(i)}: missing from the store ({MANIFEST} lists it)")
            if remote[0] != info.bytes:
                raise ShardError(f"{self.url(i)}: {remote[0]} bytes in the store, {MANIFEST} says {info.bytes}: "
                                 "changed since the manifest was written; publish the dataset again "
                                 "(alexnet-prep --out URL)")
            if self._intact_copy(i):
                found.add(i)
            elif self.path(i).exists():  # another version of the object, or of the manifest: fetched again
                with self._shard_lock(i):
                    self._remove(self.path(i))
        return found

    def _sweep(self) -> None:
        """Remove the downloads and reservations that a killed process left (their names carry its pid)."""
        for entry in os.scandir(self.dir):
            left = re.fullmatch(r"\..+\.(?:part|reserve)(\d+)-\d+", entry.name)
            if left and not _alive(int(left.group(1))):
                Path(entry.path).unlink(missing_ok=True)

    def damaged(self, i: int) -> str:
        """A copy whose bytes are not the manifest's though it was checked as it landed (bit rot, a bad disk):
        removed, so that the next run fetches it again; the message naming it."""
        with self._shard_lock(i):
            self._remove(self.path(i))
        with self._cond:
            self._present.discard(i)
        return (f"{self.path(i)} (this node's copy of {self.url(i)}): its bytes differ from {MANIFEST} (sha256) "
                "since it was fetched (bit rot, or a bad disk): the copy was removed; the next run fetches it again")

    def _record_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.json")

    def _remove(self, path: Path) -> None:
        """A copy, its index and its record (the record first: a copy without one is never trusted)."""
        for p in (self._record_path(path), path, path.with_suffix(".idx")):
            p.unlink(missing_ok=True)

    def _shard_lock(self, i: int):
        return _Flock(self.dir / f".{self.entries[i].name}.lock")

    def _intact_copy(self, i: int) -> bool:
        """Whether shard i's copy is in place, recorded as the manifest's bytes of the store's current object and
        unchanged since (its size and time)."""
        path, info = self.path(i), self.entries[i]
        try:
            record = json.loads(self._record_path(path).read_text())
            st = path.stat()
        except (OSError, ValueError):
            return False
        return record == [st.st_size, st.st_mtime_ns, info.sha256, *self.stamps[info.name]] and \
            path.with_suffix(".idx").exists()

    def _fetch(self, i: int, urgent: bool) -> bool:
        """Shard i into place (unless a rank of this node already put it there), checked against the manifest;
        False if it was not `urgent` and there was no room (the prefetcher tries again as the reader moves)."""
        info, path = self.entries[i], self.path(i)
        with self._shard_lock(i):
            if self._intact_copy(i):
                return True  # another rank of this node fetched it
            try:
                reservation = self._reserve(i, wait=urgent)
            except _NoRoom:
                return False
            part = self.dir / f".{info.name}.part{os.getpid()}-{threading.get_ident()}"
            try:
                # one GET; checked and indexed from memory, then written: the bytes are read once
                data = self.store.read_bytes(f"{self.split}/{info.name}", "download")
                if hashlib.sha256(data).hexdigest() != info.sha256:
                    raise ShardError(f"{self.url(i)}: its bytes differ from {MANIFEST} (sha256): changed in the store "
                                     "since the manifest was written; it was not read. Publish the dataset again "
                                     "(alexnet-prep --out URL)")
                index = index_of(data)
                with open(part, "wb") as f:
                    f.write(data)
                del data
                files.atomic_write(path.with_suffix(".idx"), index.encode(), durable=False)
                os.replace(part, path)
                st = path.stat()
                record = [st.st_size, st.st_mtime_ns, info.sha256, *self.stamps[info.name]]
                files.atomic_write(self._record_path(path), json.dumps(record).encode(), durable=False)
            finally:
                part.unlink(missing_ok=True)
                if reservation is not None:
                    reservation.unlink(missing_ok=True)
            self.fetched[(self._serves(i), i)] += 1
            return True

    def _serves(self, i: int) -> int:
        """The epoch that a copy of shard i fetched now is read in: this one, unless the node is done with it."""
        epoch, step = self._position
        last = self._schedule(epoch, self.node).get(i, (0, -1))[1]
        return epoch if last >= step - self.margin else epoch + 1

    @property
    def downloads(self) -> int:
        """The shards this loader fetched from the store."""
        return sum(self.fetched.values())

    # ---- the budget --------------------------------------------------------------------------------------

    def _schedule(self, epoch: int, ranks: tuple[int, ...]) -> dict[int, tuple[int, int]]:
        key = (epoch, ranks)
        if key not in self._schedules:
            if len(self._schedules) > 8:
                self._schedules.clear()
            self._schedules[key] = self.plan.uses(epoch, ranks)
        return self._schedules[key]

    def _next_use(self, epoch: int, step: int) -> dict[int, float]:
        """Per shard of this split, the node's next use as a step counted from the start of `epoch` (in use now:
        -1; next epoch: its step plus this epoch's steps; not soon: absent)."""
        steps, out = self.plan.steps, {}  # type: int, dict[int, float]
        for i, (first, _) in self._schedule(epoch + 1, self.node).items():
            out[i] = steps + first
        for i, (first, last) in self._schedule(epoch, self.node).items():
            if last >= step - self.margin:
                out[i] = -1 if first <= step + self.margin else first
        if step < self.margin and epoch > 0:  # a lagging rank may still be finishing the previous epoch
            for i, (_, last) in self._schedule(epoch - 1, self.node).items():
                if last >= steps - self.margin:
                    out[i] = -1
        return out

    def _fit_budget(self, epoch: int, margins: tuple[int, ...]) -> None:
        """self.margin: the first of `margins` whose need the budget holds; none: refused (_check_budget), naming
        the last one's need."""
        for self.margin in margins:
            if self._need(epoch)[0] <= (self.budget or 0):
                return
        self._check_budget(epoch)

    def _check_budget(self, epoch: int) -> None:
        """Refuse a budget below what the node holds at once (_need)."""
        need, shards_at_most = self._need(epoch)
        if self.budget is not None and self.budget < need:
            raise ShardError(f"--cache-size {human(self.budget)} is less than this node reads at once from "
                             f"{self.store.url}/{self.split}: {human(need)} ({shards_at_most} shards open in the "
                             f"windows of its streams, and {self.threads} being fetched); raise --cache-size, or "
                             "lower --shuffle-window, --streams or --batches-per-run")

    def _need(self, epoch: int) -> tuple[int, int]:
        """(bytes, shards): the most the node holds at once in this epoch and the next (the shards in use, each
        from self.margin before its first use to self.margin after its last) plus a fetch per thread."""
        sizes = np.array([e.bytes for e in self.entries], np.int64)
        steps, most, shards_at_most = self.plan.steps, 0, 0
        live = np.zeros(2 * steps + 2 * self.margin + 2, np.int64)
        count = np.zeros_like(live)
        for k, e in enumerate((epoch, epoch + 1)):
            for i, (first, last) in self._schedule(e, self.node).items():
                a, b = k * steps + max(0, first - self.margin) + self.margin, k * steps + last + 2 * self.margin
                live[a] += sizes[i]
                live[b + 1] -= sizes[i]
                count[a] += 1
                count[b + 1] -= 1
        at = int(np.argmax(np.cumsum(live)))
        most, shards_at_most = int(np.cumsum(live)[at]), int(np.cumsum(count)[at])
        return most + self.threads * int(sizes.max()), shards_at_most

    def _usage(self) -> tuple[int, list[tuple[Path, int]]]:
        """Bytes the dataset's directory holds or has reserved, and its complete copies (path, bytes)."""
        used, copies = 0, []
        for split_dir in (p for p in self.root.iterdir() if p.is_dir()):
            for entry in os.scandir(split_dir):
                copy = entry.name.endswith(".tar") and not entry.name.startswith(".")
                if not copy and ".reserve" not in entry.name:
                    continue
                try:  # a reservation is a sparse file: its size is the bytes it holds back
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue  # a fetch that just ended (its reservation goes outside the budget's lock)
                used += size
                if copy:
                    copies.append((Path(entry.path), size))
        return used, copies

    def _reserve(self, i: int, wait: bool) -> Path | None:
        """Room for shard i within the budget (evicting by Belady's rule; with `wait`, waiting for the readers
        to move on, else _NoRoom at once): a reservation file, sparse and sized, that other ranks' sums count
        until the copy is in place. None without a budget. A fetch ahead never waits: it would hold a fetching
        thread that a shard needed now may be waiting for."""
        if self.budget is None:
            return None
        reservation = self.dir / f".{self.entries[i].name}.reserve{os.getpid()}-{threading.get_ident()}"
        need, names = self.entries[i].bytes, {e.name: k for k, e in enumerate(self.entries)}
        while True:
            with _Flock(self.root / ".budget.lock"):
                used, copies = self._usage()
                upcoming = self._next_use(*self._position)
                mine = upcoming.get(i, NOT_SOON)
                # another split's copies first, then by Belady's rule: the one read again latest first
                later = [(OTHER_SPLIT if path.parent != self.dir else upcoming.get(names.get(path.name, -1), NOT_SOON),
                          path, size) for path, size in copies]
                for when, path, size in sorted(later, key=lambda c: c[0], reverse=True):
                    if used + need <= self.budget or when <= mine:
                        break
                    self._remove(path)
                    used -= size
                if used + need <= self.budget:
                    with open(reservation, "wb") as f:
                        f.truncate(need)
                    return reservation
            if not wait:
                raise _NoRoom
            with self._cond:
                if self._closed:
                    raise ShardError(f"{self.url(i)}: the loader closed while this shard waited for cache room")
                self._cond.wait(0.2)

    # ---- fetching ahead ----------------------------------------------------------------------------------

    def advance(self, epoch: int, step: int) -> None:
        """The reader is at `step` of `epoch`: fetch for it, and evict behind it."""
        with self._cond:
            if (epoch, step) != self._position:
                self._position = (epoch, step)
                self._cond.notify_all()

    def _wanted(self) -> list[int]:
        """The shards to have now, in the order this rank reads them: those in use, then up to read_ahead more
        (the rest of this epoch, then the next)."""
        epoch, step = self._position
        now: list[int] = []
        ahead: list[int] = []
        for e, start in ((epoch, step), (epoch + 1, -1)):
            for i, (first, last) in self._schedule(e, (self.plan.rank,)).items():
                if last < start - self.margin or i in now or i in ahead:
                    continue
                (now if e == epoch and first <= step else ahead).append(i)
                if len(ahead) >= self.read_ahead:
                    return now + ahead
        return now + ahead

    def _prefetch(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._position != self._no_room_at:  # a fetch ahead found no room: wait for the reader
                    wanted = [i for i in self._wanted() if not self._held(i) and i not in self._failed]
                    for i in wanted:
                        if len(self._inflight) >= self.threads:
                            break
                        if i not in self._inflight:
                            self._inflight.add(i)
                            try:
                                self._pool.submit(self._task, i, False)
                            except RuntimeError:  # the interpreter exits: its executors stop before atexit
                                return  # closes a cache whose loader was never closed
                self._cond.wait(0.5)

    def _held(self, i: int) -> bool:
        """Whether shard i's copy is in place (under _cond). A copy evicted since it came (by a fetch of a shard
        read sooner, this rank's or another's of the node) is fetched again when its turn comes, not when the
        reader finds it gone: under a budget smaller than the read-ahead, most copies fetched ahead go so."""
        if i in self._present and not self.path(i).exists():
            self._present.discard(i)
        return i in self._present

    def _task(self, i: int, urgent: bool) -> None:
        try:
            fetched = self._fetch(i, urgent)
        except BaseException as e:  # noqa: BLE001 (handed to the reader, which raises it when it needs shard i)
            with self._cond:
                self._failed[i] = e
                self._inflight.discard(i)
                self._cond.notify_all()
            return
        with self._cond:
            if fetched:
                self._present.add(i)
            else:
                self._no_room_at = self._position
            self._inflight.discard(i)
            self._cond.notify_all()

    def need(self, i: int) -> Path:
        """Shard i's copy, waited for (and fetched at once if the prefetcher had not got to it); the fetch's
        error if it failed."""
        with self._cond:
            while True:
                if i in self._failed:
                    raise self._failed.pop(i)
                if self._held(i):
                    return self.path(i)
                if i not in self._inflight:
                    self._inflight.add(i)
                    self._pool.submit(self._task, i, True)
                self._cond.wait(0.5)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _NoRoom(Exception):
    """No room in the budget for a fetch ahead."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return pid > 0


class _Flock:
    """An exclusive flock on a lock file, held inside `with`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False
