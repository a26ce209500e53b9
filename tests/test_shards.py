import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import read_samples

from alexnet_pipeline import shards
from alexnet_pipeline.prep import workers


def test_index_equals_what_wds2idx_writes(prepped, tmp_path):
    wds2idx = shutil.which("wds2idx") or str(__import__("pathlib").Path(sys.executable).parent / "wds2idx")
    for tar in shards.shard_paths(prepped, "train")[:2]:
        subprocess.run([wds2idx, str(tar), str(tmp_path / "x.idx")], check=True, capture_output=True)
        assert (tmp_path / "x.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_an_indexs_extent_is_its_sample_count_and_the_end_of_its_last_members_data(prepped):
    """What a loader checks an index against the manifest's bytes by: an index pointing past its shard is
    caught only if the extent is where the last member's data ends, not where it starts."""
    for tar in shards.shard_paths(prepped, "train")[:2]:
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
        samples = sum(m.name.endswith(".jpg") for m in members)
        assert shards.index_extent(tar.with_suffix(".idx")) == (samples, members[-1].offset_data + members[-1].size)


def test_an_index_of_another_number_of_samples_than_the_manifests_is_refused_naming_it(prepped, tmp_path):
    info = shards.load_manifest(prepped).splits["train"].shards[0]
    idx = tmp_path / "x.idx"
    head, *lines = shards.shard_paths(prepped, "train")[0].with_suffix(".idx").read_text().splitlines(keepends=True)
    idx.write_text(head + "".join(lines))
    assert len(shards.read_index(idx, info).jpg_offsets) == info.samples
    idx.write_text(f"v1.2 {len(lines) - 1}\n" + "".join(lines[:-1]))  # consistent, its last sample dropped
    with pytest.raises(shards.ShardError, match=f"x.idx: does not describe {info.name} \\({info.samples - 1} samples"):
        shards.read_index(idx, info)


def test_readable_by_the_webdataset_library(prepped, sample):
    import webdataset as wds

    urls = [str(p) for p in shards.shard_paths(prepped, "val")]
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        assert s["jpg"].shape == (256, 256, 3)
        seen[s["__key__"]] = int(s["cls"])
    assert seen == {k.split(".")[0]: v for k, v in sample[1]["val"].items()}


def test_readable_by_dali_with_the_written_index(prepped):
    from nvidia.dali import fn, pipeline_def, types

    tars = [str(p) for p in shards.shard_paths(prepped, "train")]
    expected = read_samples(prepped, "train")

    @pipeline_def(batch_size=8, num_threads=2, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=tars, index_paths=[t[:-3] + "idx" for t in tars],
                                         ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
                                         missing_component_behavior="error", name="r")
        return fn.decoders.image(jpg, device="cpu"), lbl

    p = pipe()
    p.build()
    n = p.epoch_size("r")
    assert n == len(expected)
    labels = []
    for _ in range((n + 7) // 8):
        images, lbl = p.run()
        assert all(np.array(images[i]).shape == (256, 256, 3) for i in range(len(images)))
        labels += [int(np.array(lbl[i])[0]) for i in range(len(lbl))]
    assert sorted(labels[:n]) == sorted(v[0] for v in expected.values())


def test_verify_passes_then_names_a_flipped_byte_and_a_deleted_shard(prepped, tmp_path):
    assert shards.verify(prepped) == []
    copy = tmp_path / "copy"
    shutil.copytree(prepped, copy)
    tar = shards.shard_paths(copy, "train")[1]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0x40
    tar.write_bytes(bytes(data))
    problems = shards.verify(copy)
    assert problems and tar.name in problems[0] and "sha256" in problems[0]
    victim = shards.shard_paths(copy, "val")[0]
    victim.unlink()
    problems = shards.verify(copy)
    assert any(victim.name in p and "missing" in p for p in problems)
    with workers.pool(2) as pool:
        assert shards.verify(copy, pool=pool) == problems  # the shards read by two processes: the same verdicts


def test_verify_reads_the_shards_in_its_workers(prepped, monkeypatch):
    import os

    pids = set()
    real = shards._shard_problems
    monkeypatch.setattr(shards, "_shard_problems", lambda *a: pids.add(os.getpid()) or real(*a))
    progress = type("P", (), {"n": 0, "update": lambda self, k=1: setattr(self, "n", self.n + k)})()
    with workers.pool(2) as pool:
        assert shards.verify(prepped, pool=pool, progress=progress) == []
    assert pids == set() and progress.n == sum(len(e.shards) for e in shards.load_manifest(prepped).splits.values())
    with workers.pool(1) as pool:
        assert shards.verify(prepped, pool=pool) == [] and pids == {os.getpid()}


def test_verify_names_a_bad_index_and_a_missing_manifest(prepped, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepped, copy)
    idx = shards.shard_paths(copy, "val")[0].with_suffix(".idx")
    idx.write_text(idx.read_text().replace("jpg 512 ", "jpg 1024 ", 1))
    assert any(idx.name in p for p in shards.verify(copy))
    assert "no manifest" in shards.verify(tmp_path)[0]


def test_verify_takes_labels_from_zero_to_the_last_class_and_names_one_past_it(prepped, tmp_path):
    import dataclasses

    copy = tmp_path / "copy"
    shutil.copytree(prepped, copy)
    (copy / ".verified.json").unlink(missing_ok=True)
    manifest = shards.load_manifest(copy)
    n = len(manifest.classes)
    path = shards.shard_paths(copy, "val")[0]
    first, *rest = shards.iter_samples(path.read_bytes())
    for label, problems in ((n - 1, []), (n, [f"{path}: {first.key}: label {n} out of range"])):
        manifest.splits["val"].shards[0] = shards.write_shard(path, [dataclasses.replace(first, label=label), *rest])
        shards.write_manifest(copy, manifest)
        assert shards.verify(copy) == problems


def test_tar_bytes_depend_only_on_content():
    a = shards.build_shard([shards.Sample("k1", b"abc", 3), shards.Sample("k2", b"d" * 700, 0)])
    b = shards.build_shard([shards.Sample("k1", b"abc", 3), shards.Sample("k2", b"d" * 700, 0)])
    assert a == b and a[1].startswith("v1.2 2\n")


def test_timm_finds_both_splits_through_info_json(prepped):
    """timm's WebDataset reader takes SHARDS/_info.json: per split name, num_samples, filenames relative to
    the root, shard_lengths (timm.data.readers.reader_wds); samples are jpg + cls, what it reads by default."""
    import json

    import webdataset as wds

    info = json.loads((prepped / "_info.json").read_text())
    manifest = shards.load_manifest(prepped)
    assert set(info["splits"]) == {"train", "validation"}
    for ours, theirs in (("train", "train"), ("val", "validation")):
        split = info["splits"][theirs]
        assert split["name"] == theirs and split["num_samples"] == manifest.splits[ours].samples
        assert sum(split["shard_lengths"]) == split["num_samples"]
        for name, length in zip(split["filenames"], split["shard_lengths"], strict=True):
            samples = list(wds.WebDataset(str(prepped / name), shardshuffle=False))
            assert len(samples) == length and all({"jpg", "cls"} <= set(s) for s in samples)


def test_timm_reads_the_shards_when_installed(prepped):
    reader_wds = pytest.importorskip("timm.data.readers.reader_wds")
    reader = reader_wds.ReaderWds(str(prepped), split="validation")
    assert reader.num_samples == shards.load_manifest(prepped).splits["val"].samples


def test_shards_of_format_3_still_load(prepped, tmp_path):
    """Format 4 changed how prep orders and lists, not what a reader reads: format 3's shards still load."""
    import json

    from alexnet_pipeline.pipeline import train_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["format_version"] = 3
    (copy / "dataset.json").write_text(json.dumps(manifest))
    (copy / "source.listing.gz").rename(copy / "source.json.gz")  # format 3's name for its listing
    assert shards.verify(copy) == []
    assert next(iter(train_loader(copy, batch_size=4, num_threads=1)))[0].shape[0] == 4


def test_verify_records_every_shard_so_the_next_loader_start_hashes_none(prepped, tmp_path, monkeypatch):
    from alexnet_pipeline import cli, verified

    copy = tmp_path / "c"
    shutil.copytree(prepped, copy, copy_function=shutil.copyfile)  # times not kept: every shard would miss
    (copy / verified.VERIFIED).unlink(missing_ok=True)
    assert cli.prep_main(["--verify", str(copy), "--workers", "1", "--no-progress"]) == 0
    hashed, real = [], verified.file_sha256
    monkeypatch.setattr(verified, "file_sha256", lambda p: hashed.append(p) or real(p))
    for split in ("train", "val"):
        verified.readable_split(copy, split)
    assert hashed == []


def test_the_first_shards_holding_a_number_of_samples_are_just_enough():
    entries = [shards.ShardInfo(f"s{k}", n, 1, "") for k, n in enumerate([5, 7, 4])]
    wanted = {1: 1, 5: 1, 6: 2, 12: 2, 13: 3, 16: 3, 100: 3, None: 3}
    assert {n: shards.first_shards(entries, n) for n in wanted} == wanted
