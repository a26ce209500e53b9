"""The stat cache: a read-only copy is hashed once (its cache kept per user), and ranks share the hashing."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from alexnet_pipeline import shards, verified


def _read_only(copy, monkeypatch) -> list:
    """`copy` unwritable to this process (tests run as root, for whom every directory is writable); the list
    that collects the paths hashed from now on."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK and str(p).startswith(str(copy))
                        else real_access(p, mode))
    hashed, real = [], verified.file_sha256
    monkeypatch.setattr(verified, "file_sha256", lambda p: hashed.append(p) or real(p))
    return hashed


def test_a_read_only_copy_is_hashed_once_and_keeps_its_cache_per_user(prepped, tmp_path, monkeypatch):
    copy = tmp_path / "ro"
    shutil.copytree(prepped, copy, copy_function=shutil.copyfile)  # no times kept: every shard misses once
    (copy / verified.VERIFIED).unlink(missing_ok=True)
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    hashed = _read_only(copy, monkeypatch)
    before = sorted(p.name for p in copy.iterdir())
    verified.readable_split(copy, "train")
    assert len(hashed) == len(shards.shard_paths(copy, "train"))
    hashed.clear()
    verified.readable_split(copy, "train")
    assert hashed == []  # trusted from the per-user cache
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written into the read-only copy
    cached = list((home / "alexnet-pipeline").glob("verified-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == len(shards.shard_paths(copy, "train"))



def test_a_read_only_copy_that_kept_its_times_trusts_the_cache_it_carries(prepped, tmp_path, monkeypatch):
    copy = tmp_path / "ro"
    shutil.copytree(prepped, copy)  # times kept, and the writer's cache with them
    assert (copy / verified.VERIFIED).is_file()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = _read_only(copy, monkeypatch)
    verified.readable_split(copy, "train")
    assert hashed == []



def test_what_is_remembered_last_wins_over_what_the_cache_held(tmp_path):
    """A shard re-hashed after its times changed: its new entry replaces the old one, not the other way round."""
    verified.remember(tmp_path, {"train/a.tar": [10, 1, "old"], "train/b.tar": [20, 2, "kept"]})
    verified.remember(tmp_path, {"train/a.tar": [10, 5, "new"]})
    assert verified.read(tmp_path) == {"train/a.tar": [10, 5, "new"], "train/b.tar": [20, 2, "kept"]}


TWO_RANKS = """
import json, os, sys, threading
import torch.distributed as dist
from alexnet_pipeline import shards, verified
from alexnet_pipeline.pipeline import train_loader
dist.init_process_group("gloo")
rank, copy = dist.get_rank(), sys.argv[1]
hashed, real = [], verified.file_sha256
verified.file_sha256 = lambda p: hashed.append(os.path.basename(p)) or real(p)
report = {}
train_loader(copy, batch_size=4, num_threads=1, rank=rank, world_size=2).wait_for_digest()
report["first"] = list(hashed)
hashed.clear()
train_loader(copy, batch_size=4, num_threads=1, rank=rank, world_size=2).wait_for_digest()
report["second"] = list(hashed)
dist.barrier()
if rank == 0:  # the other rank's share: shard 1 of the train split (every second shard is rank 1's)
    path = shards.shard_paths(copy, "train")[1]
    data = bytearray(open(path, "rb").read()); data[-2000] ^= 0xFF
    open(path, "wb").write(bytes(data))
dist.barrier()
try:
    train_loader(copy, batch_size=4, num_threads=1, rank=rank, world_size=2)
    report["damage"] = None
except shards.ShardError as e:
    report["damage"] = str(e)
json.dump(report, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_two_ranks_share_the_hashing_and_both_name_a_shard_only_one_of_them_hashed(prepped, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy, copy_function=shutil.copyfile)
    (copy / verified.VERIFIED).unlink(missing_ok=True)
    (tmp_path / "two.py").write_text(TWO_RANKS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(tmp_path / "two.py"), str(copy), str(tmp_path)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    names = [p.name for p in shards.shard_paths(copy, "train")]
    for k, report in enumerate(ranks):  # each rank hashed its share (every second shard), then nothing
        assert report["first"] == names[k::2] and report["second"] == [], (k, report)
    assert len(json.loads((copy / verified.VERIFIED).read_text())) == len(names)  # rank 0 wrote all of them
    for report in ranks:
        assert report["damage"] and report["damage"].startswith(f"{copy / 'train' / names[1]}: its bytes differ")


@pytest.mark.parametrize("rank", [0, 1])
def test_without_a_process_group_each_rank_hashes_its_share_and_merges_it(prepped, tmp_path, rank, monkeypatch):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy, copy_function=shutil.copyfile)
    (copy / verified.VERIFIED).unlink(missing_ok=True)
    paths, entries = shards.shard_paths(copy, "train"), shards.load_manifest(copy).splits["train"].shards
    assert verified.hash_changed(copy, "train", entries, paths, rank, 2) == len(paths[rank::2])
    assert verified.hash_changed(copy, "train", entries, paths, 1 - rank, 2) == len(paths[1 - rank::2])
    assert verified.hash_changed(copy, "train", entries, paths, 0, 1) == 0  # both shares merged into the cache


def test_a_read_only_directory_whose_manifest_cannot_be_read_keeps_its_cache_per_user(tmp_path, monkeypatch):
    """A directory this user cannot write keeps its stat cache under XDG_CACHE_HOME, keyed on the manifest's
    bytes; a manifest that cannot be read (here a directory in its place) keys on the path alone, no crash."""
    (tmp_path / "s" / shards.MANIFEST).mkdir(parents=True)
    monkeypatch.setattr(verified.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = verified.cache_path(tmp_path / "s")
    assert path.parent == tmp_path / "xdg" / "alexnet-pipeline" and path.name.startswith("verified-")


def test_a_read_only_copys_cache_is_keyed_on_its_manifest_so_another_dataset_at_its_path_is_hashed_anew(
        tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    monkeypatch.setattr(verified.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    manifest = tmp_path / "s" / shards.MANIFEST
    manifest.write_text('{"version": 4, "seed": 0}')
    first = verified.cache_path(tmp_path / "s")
    manifest.write_text('{"version": 4, "seed": 1}')  # the dataset replaced in place (another prep, a new copy)
    assert verified.cache_path(tmp_path / "s") != first
    manifest.write_text('{"version": 4, "seed": 0}')
    assert verified.cache_path(tmp_path / "s") == first


def test_a_damaged_shard_is_named_though_shards_hashed_after_it_are_intact(prepped, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy, copy_function=shutil.copyfile)  # new times: every shard is hashed
    (copy / verified.VERIFIED).unlink(missing_ok=True)
    paths, entries = shards.shard_paths(copy, "train"), shards.load_manifest(copy).splits["train"].shards
    assert len(paths) >= 3
    data = bytearray(paths[0].read_bytes())
    data[700] ^= 0xFF  # same size: only the hash tells
    paths[0].write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match=rf"{paths[0]}: its bytes differ"):
        verified.hash_changed(copy, "train", entries, paths)
    assert not (copy / verified.VERIFIED).exists()  # nothing recorded as intact from a failed check


def test_a_shard_longer_than_the_manifest_or_an_index_short_of_it_is_named_before_any_read(prepped, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    paths = shards.shard_paths(copy, "train")
    original = paths[0].read_bytes()
    paths[0].write_bytes(original + b"\0" * 512)  # one more block: a reader would never notice
    with pytest.raises(shards.ShardError, match=rf"{paths[0]}: {len(original) + 512} bytes, dataset.json says"):
        verified.readable_split(copy, "train")
    paths[0].write_bytes(original)
    index = paths[1].with_suffix(".idx")
    head, *lines = index.read_text().splitlines(keepends=True)
    index.write_text(f"v1.2 {len(lines) - 1}\n" + "".join(lines[:-1]))  # consistent, its last sample dropped
    with pytest.raises(shards.ShardError, match=rf"{index}: does not describe {paths[1].name}"):
        verified.readable_split(copy, "train")
