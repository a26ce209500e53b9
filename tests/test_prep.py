import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet_pipeline import shards
from alexnet_pipeline.prep import PrepConfig, PrepError, run
from conftest import CLASSES, read_samples, sample_maker

CLI = [sys.executable, "-c", "import sys; from alexnet_pipeline.cli import prep_main; sys.exit(prep_main())"]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_quirks_kept_bad_files_reported_nothing_good_lost(prepped, sample):
    _, truth = sample
    manifest = shards.load_manifest(prepped)
    skipped = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    bad = {f"{sample_maker.WNIDS[0]}_9{k:03d}.JPEG" for k, (_, _, kept) in enumerate(sample_maker.QUIRKS) if not kept}
    assert set(skipped) == bad | {sample_maker.STRAY}
    assert all(skipped.values())
    got = read_samples(prepped, "train")
    want = {n.split(".")[0]: label for n, label in truth["train"].items() if n not in skipped}
    assert {k: v[0] for k, v in got.items()} == want
    assert manifest["splits"]["train"]["samples"] == len(want)


def test_train_is_shuffled_and_val_is_in_key_order(prepped):
    train_keys = list(read_samples(prepped, "train"))
    val_keys = list(read_samples(prepped, "val"))
    assert train_keys != sorted(train_keys)
    first_shard = [k for k in train_keys[:5]]
    assert len({k.split("_")[0] for k in first_shard}) > 1  # classes are mixed within a shard
    assert val_keys == sorted(val_keys)


def test_same_bytes_for_any_worker_count(prepped, sample, tmp_path):
    run(PrepConfig(sample[0] / "extracted", tmp_path / "w3", shard_size=5, workers=3, progress=False))
    assert _files(tmp_path / "w3") == _files(prepped)


def test_archives_give_the_same_shards_as_folders(prepped, sample, tmp_path):
    run(PrepConfig(sample[0] / "archives", tmp_path / "a", shard_size=5, workers=2, progress=False))
    ours, theirs = _files(tmp_path / "a"), _files(prepped)
    assert {k: v for k, v in ours.items() if k.endswith((".tar", ".idx", ".npz"))} == \
           {k: v for k, v in theirs.items() if k.endswith((".tar", ".idx", ".npz"))}


@pytest.mark.parametrize("kill_when", ["units", "shards", "random"])
def test_killed_and_resumed_run_gives_identical_bytes(prepped, sample, tmp_path, kill_when):
    out = tmp_path / "k"
    args = CLI + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), "--shard-size", "5",
                  "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if kill_when == "units" and len(list((out / ".work").glob("*/*.npz"))) >= 1:
            break
        if kill_when == "shards" and len(list(out.glob("*/*.tar"))) >= 2:
            break
        if kill_when == "random" and time.time() > deadline - 59.4:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "dataset.json").exists():
        pytest.skip("the run finished before it could be killed")  # machine much faster than expected
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert _files(out) == _files(prepped)


def test_rerun_is_a_no_op_and_other_options_are_refused(prepped, sample, tmp_path):
    cfg = PrepConfig(sample[0] / "extracted", prepped, shard_size=5, workers=1, progress=False)
    assert run(cfg).resumed
    cfg.seed = 7
    with pytest.raises(PrepError, match="seed"):
        run(cfg)
    r = subprocess.run(CLI + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(prepped),
                              "--shard-size", "5", "--seed", "7"], capture_output=True, text=True)
    assert r.returncode == 2 and "seed" in r.stderr


def test_manifest_contents(prepped):
    m = json.loads((prepped / "dataset.json").read_text())
    assert m["format_version"] == shards.FORMAT_VERSION and m["image_size"] == 256 and m["jpeg_quality"] == 95
    assert m["classes"] == sorted(sample_maker.WNIDS[:CLASSES])
    assert m["fingerprint"]["seed"] == 0
    for split in ("train", "val"):
        assert sum(s["samples"] for s in m["splits"][split]["shards"]) == m["splits"][split]["samples"]


def test_nothing_usable_and_not_imagenet_exit_2(tmp_path):
    (tmp_path / "root/train/n01440764").mkdir(parents=True)
    (tmp_path / "root/train/n01440764/a.JPEG").write_bytes(b"")
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path / "root"), "--out", str(tmp_path / "o"),
                              "--splits", "train"], capture_output=True, text=True)
    assert r.returncode == 2 and "no usable train images" in r.stderr
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and str(tmp_path) in r.stderr and "no ImageNet classes" in r.stderr
