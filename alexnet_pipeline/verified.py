"""The stat cache: for each shard found intact on this machine, its size, modification time and sha256, so
that a loader start re-hashes only the shards whose size or time changed (a copy that lost its times, an edit
in place). The one writer and reader of that file, and the checks a loader makes of a local split before
it reads (readable_split).

- Where: SHARDS/.verified.json when the shards directory is writable; otherwise (a read-only copy, a shared
  dataset) a per-user file, ~/.cache/alexnet-pipeline/verified-<key>.json (XDG_CACHE_HOME is honoured), keyed
  on the directory's path and its manifest, so a read-only copy is hashed once, not at every start.
- Ranks share the hashing: on a miss each of torchrun's ranks hashes only its share of the missing shards
  (every world_size-th); the verdicts are gathered, every rank raises the same ShardError if one shard is
  damaged, and rank 0 writes the cache. Without a way to gather (a plain loader given rank and world_size),
  each rank merges its own findings into the cache under a lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from . import files
from .shards import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardInfo,
    file_sha256,
    first_shards,
    index_extent,
    load_manifest,
    shard_paths,
)

VERIFIED = ".verified.json"


def cache_path(shards: Path) -> Path:
    """Where the stat cache of `shards` lives: beside the shards, or per user for a read-only directory."""
    shards = Path(shards)
    if os.access(shards, os.W_OK):
        return shards / VERIFIED
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        manifest = hashlib.sha256((shards / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        manifest = ""
    key = hashlib.sha256(f"{shards.resolve()}\0{manifest}".encode()).hexdigest()[:20]
    return home / "alexnet-pipeline" / f"verified-{key}.json"


def _read(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache (or a damaged one): every shard is re-hashed once
    return cache if isinstance(cache, dict) else {}


def read(shards: Path) -> dict:
    """{split/shard: [size, mtime_ns, sha256]} of the shards found intact here (a read-only copy also trusts
    a cache it carries)."""
    path = cache_path(shards)
    carried = _read(Path(shards) / VERIFIED) if path.parent != Path(shards) else {}
    return {**carried, **_read(path)}


def remember(shards: Path, found: dict) -> None:
    """Merge `found` ({split/shard: [size, mtime_ns, sha256]}) into the cache, under a lock (ranks of one run
    may write at once). A cache that cannot be written is left: its shards are re-hashed next time."""
    if not found:
        return
    path = cache_path(shards)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            files.atomic_write(path, json.dumps({**_read(path), **found}, sort_keys=True).encode(), durable=False)
    except OSError:
        return


def entry(split: str, info: ShardInfo, path: Path) -> tuple[str, list]:
    st = path.stat()
    return f"{split}/{info.name}", [st.st_size, st.st_mtime_ns, info.sha256]


def remember_intact(shards: Path, split: str, entries: list[ShardInfo], paths: list[Path]) -> None:
    """Record that these shards (just written, or just re-hashed) match the manifest."""
    remember(shards, dict(entry(split, info, path) for path, info in zip(paths, entries, strict=True)))


def damage(path: Path, info: ShardInfo) -> str | None:
    """The message for a shard whose bytes differ from the manifest's sha256 (or cannot be read), or None."""
    try:
        if file_sha256(path) == info.sha256:
            return None
    except OSError as e:  # a message, not an exception: every rank must still reach the gather
        return f"{path}: unreadable ({e.strerror}); alexnet-prep --verify checks everything"
    return (f"{path}: its bytes differ from {MANIFEST} (sha256): damaged or edited in place; copy it again, or run "
            "alexnet-prep --rebuild over the source")


def hash_changed(shards: Path, split: str, entries: list[ShardInfo], paths: list[Path], rank: int = 0,
                 world_size: int = 1, gather=None) -> int:
    """Re-hash this rank's share of the shards whose size or modification time differ from the cache;
    ShardError naming a shard whose sha256 differs from the manifest (found by any rank, when `gather`, a
    function like torch.distributed's all_gather_object, is given). Returns how many this rank hashed."""
    cache, problem = read(shards), None
    fresh: dict[str, list] = {}
    misses = [i for i, (path, info) in enumerate(zip(paths, entries, strict=True))
              if cache.get(f"{split}/{info.name}") != entry(split, info, path)[1]]
    mine = [i for i in misses if i % world_size == rank]
    for i in mine:
        problem = damage(paths[i], entries[i])
        if problem:
            break
        fresh.update([entry(split, entries[i], paths[i])])
    if gather is None:
        verdicts = [(fresh, problem)]
    else:
        verdicts = gather((fresh, problem))
    problems = [p for _, p in verdicts if p]
    if problems:
        raise ShardError(problems[0])
    if gather is None or rank == 0:
        remember(shards, {k: v for found, _ in verdicts for k, v in found.items()})
    return len(mine)


def remember_verified(shards: Path) -> None:
    """After `alexnet-prep --verify` found every byte intact (say, in a copy that did not keep its times):
    record every shard's size and time, so loader starts trust them without re-hashing."""
    manifest = load_manifest(shards)
    remember(shards, dict(entry(split, info, path) for split, e in manifest.splits.items()
                          for path, info in zip(shard_paths(shards, split, manifest), e.shards, strict=True)))


def readable_split(shards: Path, split: str, *, rank: int = 0, world_size: int = 1, gather=None,
                   samples: int | None = None) -> tuple[list[Path], int, Manifest]:
    """Shard paths, sample count and manifest of a split (with `samples`, only its first shards holding that
    many), after the checks that turn what would hang or crash a reader (a missing, truncated or replaced
    shard; a missing or wrong index; bytes that differ from the manifest where size or time changed, hashed
    by this rank for its share: hash_changed) into a ShardError."""
    manifest = load_manifest(shards)
    paths, entries = shard_paths(shards, split, manifest), manifest.splits[split].shards
    if not paths:
        raise ShardError(f"{Path(shards) / split}: no shards listed for {split}")
    keep = first_shards(entries, samples)
    paths, entries = paths[:keep], entries[:keep]
    n_samples = sum(e.samples for e in entries)
    for path, info in zip(paths, entries, strict=True):
        if not path.is_file():
            raise ShardError(f"{path}: shard missing")
        st = path.stat()
        if st.st_size != info.bytes:
            raise ShardError(f"{path}: {st.st_size} bytes, {MANIFEST} says {info.bytes} "
                             "(truncated or replaced; alexnet-prep --verify checks everything)")
        count, end = index_extent(path.with_suffix(".idx"))
        if end > info.bytes or count != info.samples:
            raise ShardError(f"{path.with_suffix('.idx')}: does not describe {path.name} ({count} samples to byte "
                             f"{end}; {MANIFEST} says {info.samples} in {info.bytes} bytes)")
    hash_changed(shards, split, entries, paths, rank, world_size, gather)
    return paths, n_samples, manifest
