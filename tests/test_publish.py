"""alexnet-prep --out URL (prep/publish.py) and --verify URL, against an S3 server on this machine: the manifest
goes up last, a re-run uploads only what is missing or differs, a store without the bucket is named before
any work."""

import os
import shutil
import subprocess
import sys

import pytest

from alexnet_pipeline import shards
from alexnet_pipeline.prep import publish

PREP = [sys.executable, "-m", "alexnet_pipeline", "prep"]


def _prep(sample_root, url, work, *more):
    return subprocess.run(PREP + ["--imagenet-root", str(sample_root), "--out", url, "--work-dir", str(work),
                                  "--shard-size", "5", "--workers", "1", "--no-progress", *more],
                          capture_output=True, text=True, timeout=300, env=os.environ)


def _puts(s3, since: int = 0) -> list[str]:
    prefix = f"/{s3.bucket}/"
    return [path[len(prefix):] for method, path in s3.loopback.proxy.log[since:] if method == "PUT"
            and path.startswith(prefix)]


def test_prep_to_a_store_uploads_every_file_the_manifest_last_and_a_rerun_uploads_nothing(sample, prepped, s3,
                                                                                           tmp_path):
    url = s3.url("imagenet")
    r = _prep(sample[0] / "extracted", url, tmp_path / "work")
    assert r.returncode == 0, r.stderr
    puts = _puts(s3)
    local = [p.relative_to(tmp_path / "work").as_posix() for p in (tmp_path / "work").rglob("*")
             if p.is_file() and not p.name.startswith(".")]
    assert sorted(f"imagenet/{p}" for p in local) == sorted(puts) and puts[-1] == "imagenet/dataset.json"
    assert f"published to {url}: {len(local)} files uploaded" in r.stdout
    for name in ("dataset.json", "stats.npz"):  # the same bytes as a local prep of the same source
        assert s3.fs().cat_file(f"{s3.bucket}/imagenet/{name}") == (prepped / name).read_bytes()
    before = len(s3.loopback.proxy.log)
    again = _prep(sample[0] / "extracted", url, tmp_path / "work")
    assert again.returncode == 0 and _puts(s3, before) == [], again.stderr
    assert f"0 files uploaded (0 B), {len(local)} already there" in again.stdout


def test_a_rerun_uploads_what_differs_and_another_dataset_loses_its_manifest_before_anything_goes_up(
        sample, s3, tmp_path):
    url = s3.url("imagenet")
    assert _prep(sample[0] / "extracted", url, tmp_path / "work").returncode == 0
    key = f"{s3.bucket}/imagenet/train/train-000001.tar"
    s3.fs().pipe(key, b"\0" * 512)  # damaged in the store
    before = len(s3.loopback.proxy.log)
    assert _prep(sample[0] / "extracted", url, tmp_path / "work").returncode == 0
    assert _puts(s3, before) == ["imagenet/train/train-000001.tar"]
    before = len(s3.loopback.proxy.log)
    other = _prep(sample[0] / "extracted", url, tmp_path / "work2", "--shard-size", "7")  # another dataset there
    assert other.returncode == 0, other.stderr
    log = s3.loopback.proxy.log[before:]
    deleted = log.index(("DELETE", f"/{s3.bucket}/imagenet/dataset.json"))
    assert all(m != "PUT" for m, _ in log[:deleted]) and ("PUT", f"/{s3.bucket}/imagenet/dataset.json") in log
    assert shards.load_manifest(url).fingerprint["shard_size"] == 7


def test_prep_to_a_bucket_that_does_not_exist_is_one_line_before_any_work(sample, s3, tmp_path):
    r = _prep(sample[0] / "extracted", "s3://no-such-bucket/imagenet", tmp_path / "work")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "s3://no-such-bucket/imagenet" in lines[0], r.stderr
    assert not (tmp_path / "work").exists()


def test_verify_reads_a_dataset_in_a_store_and_names_a_damaged_shard_by_its_url(prepped, s3, tmp_path):
    from conftest import publish_to

    publish_to(s3.loopback, prepped, s3.url("data"))
    ok = subprocess.run(PREP + ["--verify", s3.url("data"), "--workers", "2"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and f"{s3.url('data')}: OK" in ok.stdout, ok.stderr
    key = f"{s3.bucket}/data/val/val-000001.tar"
    data = bytearray(s3.fs().cat_file(key))
    data[2000] ^= 0xFF
    s3.fs().pipe(key, bytes(data))
    bad = subprocess.run(PREP + ["--verify", s3.url("data")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"{s3.url('data', 'val', 'val-000001.tar')}: size or sha256 differs" in bad.stderr


def test_a_rerun_trusts_its_upload_record_and_reads_no_file_again(prepped, s3, tmp_path, monkeypatch):
    """The record of each upload (size, time, the object's ETag) spares a re-run hashing 45 GB: an ETag is the
    MD5 only of single-part uploads, so without the record a multipart store would take every file again."""
    local = tmp_path / "local"
    shutil.copytree(prepped, local)
    first = publish.publish(local, s3.url("recorded"))
    assert first.uploaded > 0 and first.kept == 0
    md5 = publish._md5
    monkeypatch.setattr(publish, "_md5", lambda path: pytest.fail(f"{path} hashed again"))
    again = publish.publish(local, s3.url("recorded"))
    assert again.uploaded == 0 and again.kept == first.uploaded
    monkeypatch.setattr(publish, "_md5", md5)  # (undo() would take the store's credentials with it)
    key = f"{s3.bucket}/recorded/train/{shards.shard_paths(local, 'train')[0].name}"
    data = bytearray(s3.fs().cat_file(key))
    data[700] ^= 0xFF
    s3.fs().pipe(key, bytes(data))  # replaced in the store by the same number of other bytes: another ETag
    assert publish.publish(local, s3.url("recorded")).uploaded == 1
    assert s3.fs().cat_file(key) == shards.shard_paths(local, "train")[0].read_bytes()
    (local / publish.RECORD).unlink()  # the record lost: single-part uploads are recognised by their MD5
    assert publish.publish(local, s3.url("recorded")).uploaded == 0
