import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, PREP, held_prep, read_samples, sample_maker

from alexnet_pipeline import files, shards
from alexnet_pipeline.prep import WORK, PrepConfig, PrepError, run, workers

CLI = PREP


def _files(d: Path) -> dict[str, bytes]:
    """Every file's bytes but the dot-files' (the lock and the machine-local stat cache): what `sha256sum` over
    the directory compares."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)}


def test_quirks_kept_bad_files_reported_nothing_good_lost(prepped, sample):
    _, truth = sample
    manifest = shards.load_manifest(prepped)
    skipped = {Path(s["source"]).name: s["reason"] for s in manifest.skipped}
    bad = {f"{sample_maker.WNIDS[0]}_9{k:03d}.JPEG" for k, (_, _, kept) in enumerate(sample_maker.QUIRKS) if not kept}
    assert set(skipped) == bad | {sample_maker.STRAY}
    assert all(skipped.values())
    got = read_samples(prepped, "train")
    want = {n.split(".")[0]: label for n, label in truth["train"].items() if n not in skipped}
    assert {k: v[0] for k, v in got.items()} == want
    assert manifest.splits["train"].samples == len(want)


def test_train_is_shuffled_and_val_is_in_key_order(prepped):
    train_keys = list(read_samples(prepped, "train"))
    val_keys = list(read_samples(prepped, "val"))
    assert train_keys != sorted(train_keys)
    first_shard = [k for k in train_keys[:5]]
    assert len({k.split("_")[0] for k in first_shard}) > 1  # classes are mixed within a shard
    assert val_keys == sorted(val_keys)


def test_the_seed_sets_the_train_order_in_an_output_a_killed_run_left_with_its_lock_and_archive_cache(
        prepped, sample, tmp_path):
    """--seed 7 orders the train split by the keyed hash under 7 (not the default seed's order); an output that
    holds only what a run killed early leaves (its lock, the archive cache) is prep's own, not refused."""
    import gzip

    from alexnet_pipeline.prep import listing, order_key

    out = tmp_path / "s7"
    out.mkdir()
    (out / files.LOCK).write_bytes(b"")
    (out / listing.ARCHIVES).write_bytes(gzip.compress(b"{}"))
    run(PrepConfig(sample[0] / "extracted", out, ("train",), shard_size=5, workers=1, progress=False, seed=7))
    ours, theirs = list(read_samples(out, "train")), list(read_samples(prepped, "train"))
    assert sorted(ours) == sorted(theirs) and ours != theirs
    assert ours == sorted(ours, key=lambda k: (order_key(k, 7), k))


def test_same_bytes_for_any_worker_count(prepped, sample, tmp_path):
    run(PrepConfig(sample[0] / "extracted", tmp_path / "w3", shard_size=5, workers=3, progress=False))
    assert _files(tmp_path / "w3") == _files(prepped)


def test_archives_give_the_same_shards_as_folders(prepped, sample, tmp_path):
    run(PrepConfig(sample[0] / "archives", tmp_path / "a", shard_size=5, workers=2, progress=False))
    ours, theirs = _files(tmp_path / "a"), _files(prepped)
    assert {k: v for k, v in ours.items() if k.endswith((".tar", ".idx", ".npz"))} == \
           {k: v for k, v in theirs.items() if k.endswith((".tar", ".idx", ".npz"))}


@pytest.mark.parametrize("stage,workers", [("units", "1"), ("shards", "1"), ("units", "2")])
def test_killed_and_resumed_run_gives_identical_bytes(prepped, sample, tmp_path, stage, workers):
    """SIGKILL (as the OOM killer sends it) when a unit, or a shard, has just been written: by the parent itself
    (one worker) or by a worker (two; the parent is killed and takes its workers with it)."""
    out = tmp_path / "k"
    args = ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), "--shard-size", "5",
            "--workers", workers, "--no-progress"]
    proc = held_prep(args, out, stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()
    r = subprocess.run(PREP + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
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
        names = [s["name"] for s in m["splits"][split]["shards"]]
        assert len(names) > 1 and names == [f"{split}-{k:06d}.tar" for k in range(len(names))]


def test_nothing_usable_and_not_imagenet_exit_2(tmp_path):
    (tmp_path / "root/train/n01440764").mkdir(parents=True)
    (tmp_path / "root/train/n01440764/a.JPEG").write_bytes(b"")
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path / "root"), "--out", str(tmp_path / "o"),
                              "--splits", "train"], capture_output=True, text=True)
    assert r.returncode == 2 and "no usable train images" in r.stderr
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and str(tmp_path) in r.stderr and "no ImageNet classes" in r.stderr


def _tiny_tree(root: Path, sample, names=("n01440764_1652.JPEG", "n01440764_273.JPEG")) -> Path:
    """A one-class tree with a few of the sample's real files (two train, the val ones)."""
    src = sample[0] / "extracted"
    (root / "train/n01440764").mkdir(parents=True)
    files = sorted((src / "train/n01440764").glob("n01440764_[0-8]*.JPEG"))[:len(names)]
    for f, name in zip(files, names, strict=True):
        (root / "train/n01440764" / name).write_bytes(f.read_bytes())
    shutil.copytree(src / "val/n01440764", root / "val/n01440764")
    return root


def test_a_file_name_with_spaces_is_kept_under_a_key_dalis_index_can_read(sample, tmp_path):
    from alexnet_pipeline.pipeline import train_loader

    root = _tiny_tree(tmp_path / "r", sample, ("a b.JPEG", "n01440764_273.JPEG"))
    run(PrepConfig(root, tmp_path / "o", workers=1, progress=False))
    assert shards.verify(tmp_path / "o") == []
    assert "a%20b" in read_samples(tmp_path / "o", "train")
    labels = torch.cat([y for _, y in train_loader(tmp_path / "o", batch_size=2, num_threads=1)])
    assert sorted(labels.tolist()) == [0, 0]


def test_a_file_name_too_long_for_a_tar_member_is_skipped_naming_it(sample, tmp_path):
    long_name = "n01440764_" + "x" * 170 + ".JPEG"
    root = _tiny_tree(tmp_path / "r", sample, (long_name, "n01440764_273.JPEG"))
    report = run(PrepConfig(root, tmp_path / "o", workers=1, progress=False))
    assert report.samples["train"] == 1
    assert [Path(s["source"]).name for s in report.skipped] == [long_name]
    assert "too long" in report.skipped[0]["reason"]


def test_an_official_train_tar_cut_between_members_is_named(sample, tmp_path):
    src = sample[0] / "archives"
    (tmp_path / "a").mkdir()
    data = (src / "ILSVRC2012_img_train.tar").read_bytes()
    import tarfile
    with tarfile.open(src / "ILSVRC2012_img_train.tar") as tf:
        cut = list(tf)[2].offset  # an interrupted download that stopped between two class archives
    (tmp_path / "a/ILSVRC2012_img_train.tar").write_bytes(data[:cut])
    for name in ("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (tmp_path / "a" / name).symlink_to(src / name)
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path / "a"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "ILSVRC2012_img_train.tar: truncated" in r.stderr and "Traceback" not in r.stderr


def test_a_truncated_devkit_is_one_line_naming_it(sample, tmp_path):
    (tmp_path / "r/val").mkdir(parents=True)
    shutil.copytree(sample[0] / "extracted/train", tmp_path / "r/train")
    for f in sorted((sample[0] / "devkit/val").iterdir())[:3]:
        (tmp_path / "r/val" / f.name).write_bytes(f.read_bytes())
    devkit = (sample[0] / "archives/ILSVRC2012_devkit_t12.tar.gz").read_bytes()
    (tmp_path / "r/ILSVRC2012_devkit_t12.tar.gz").write_bytes(devkit[:len(devkit) // 2])
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path / "r"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "ILSVRC2012_devkit_t12.tar.gz: unreadable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_resume_over_a_changed_source_is_refused(sample, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(sample[0] / "extracted", root)
    out = tmp_path / "o"
    args = ["--imagenet-root", str(root), "--out", str(out), "--workers", "1", "--shard-size", "5"]
    held_prep(args, out, "units").kill()
    extra = sorted((root / "train/n01443537").iterdir())[0]
    (root / "train/n01443537/n01443537_new.JPEG").write_bytes(extra.read_bytes())
    r = subprocess.run(PREP + args, capture_output=True, text=True)
    assert r.returncode == 2 and "changed since" in r.stderr and str(root) in r.stderr


def test_a_run_stopped_right_after_its_manifest_leaves_no_work_files(prepped, sample, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(prepped, out)
    (out / ".work/train").mkdir(parents=True)
    (out / ".work/train/n01440764-000.bin").write_bytes(b"x" * 1000)
    report = run(PrepConfig(sample[0] / "extracted", out, shard_size=5, workers=1, progress=False))
    assert report.resumed and not (out / ".work").exists()
    assert _files(out) == _files(prepped)


def test_a_full_disk_is_one_line_and_the_rerun_resumes_to_the_same_bytes(prepped, sample, tmp_path, monkeypatch):
    import errno


    real, calls = files.atomic_write, []

    def full_after_three(path, data, durable=True):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, durable)

    monkeypatch.setattr(files, "atomic_write", full_after_three)
    cfg = PrepConfig(sample[0] / "extracted", tmp_path / "o", shard_size=5, workers=1, progress=False)
    with pytest.raises(PrepError, match="No space left on device; fix that and run the same command again"):
        run(cfg)
    assert not list((tmp_path / "o").rglob(".*.tmp*"))
    monkeypatch.setattr(files, "atomic_write", real)
    run(cfg)
    assert _files(tmp_path / "o") == _files(prepped)


def test_out_that_is_a_file_is_one_line(sample, tmp_path):
    (tmp_path / "f").write_text("not a directory")
    r = subprocess.run(CLI + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(tmp_path / "f")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "exists and is not a directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_prep_says_one_line_and_leaves_no_workers(sample, tmp_path, sig, status):
    out = tmp_path / "o"
    args = ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), "--workers", "2", "--shard-size", "5"]
    # its own process group, as in a terminal: Ctrl-C (SIGINT) reaches every process of it. Default handling
    # of SIGINT too, as a terminal's shell gives: a background job of a script (CI's, say) inherits it ignored
    proc = held_prep(args, out, "units", start_new_session=True,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)  # the parent alone, as `kill PID` does
    try:
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:  # the signal was lost: the held workers of the group must not live on
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, err
    assert err.strip().splitlines() == [f"alexnet-prep: interrupted by {sig.name}; run the same command again to "
                                        "resume"]
    with pytest.raises(ProcessLookupError):  # no worker of the group is left
        os.killpg(proc.pid, 0)


def test_more_workers_than_work_are_capped_and_said(sample, tmp_path):
    report = run(PrepConfig(sample[0] / "extracted", tmp_path / "o", splits=("val",), workers=1000,
                            progress=False))
    assert report.notes and "not 1000" in report.notes[0]
    report = run(PrepConfig(sample[0] / "extracted", tmp_path / "one", splits=("val",), workers=1, progress=False))
    assert not any(" workers, not " in note for note in report.notes)  # not capped: nothing to say


def test_each_splits_image_count_is_its_own(sample, tmp_path):
    """The images counted for val in a run of both splits are val's alone, as in a run of val only."""
    def images(out, **options):
        report = run(PrepConfig(sample[0] / "extracted", tmp_path / out, workers=2, progress=False, **options))
        return {s.name: s.count for s in report.stages if s.name.endswith(" images")}

    both, val = images("both"), images("val", splits=("val",))
    assert both["val images"] == val["val images"] > 0 and both["train images"] > 0


def test_a_file_beside_the_class_folders_is_skipped_once_under_its_own_split(sample, tmp_path):
    root = _tiny_tree(tmp_path / "r", sample)
    (root / "train" / "README.txt").write_text("not a class")
    report = run(PrepConfig(root, tmp_path / "o", workers=1, progress=False))
    assert [(s["split"], Path(s["source"]).name) for s in report.skipped] == [("train", "README.txt")]


def test_a_symlink_loop_is_listed_as_skipped(sample, tmp_path):
    root = _tiny_tree(tmp_path / "r", sample)
    loop = root / "train/n01440764/loop.JPEG"
    loop.symlink_to(loop)
    report = run(PrepConfig(root, tmp_path / "o", workers=1, progress=False))
    reasons = {Path(s["source"]).name: s["reason"] for s in report.skipped}
    assert "loop.JPEG" in reasons and reasons["loop.JPEG"].startswith("unreadable")


@pytest.mark.parametrize("workers", [1, 2])
def test_hugging_face_archives_give_the_same_shards_as_folders(prepped, sample, tmp_path, workers):
    report = run(PrepConfig(sample[0] / "hf", tmp_path / "h", shard_size=5, workers=workers, progress=False))
    ours, theirs = _files(tmp_path / "h"), _files(prepped)
    assert {k: v for k, v in ours.items() if k.endswith((".tar", ".idx", ".npz"))} == \
           {k: v for k, v in theirs.items() if k.endswith((".tar", ".idx", ".npz"))}
    assert any("test_images.tar.gz: test images carry no class" in n for n in report.notes)
    assert shards.load_manifest(tmp_path / "h").layout["train"].startswith("Hugging Face archives")


def test_a_truncated_hugging_face_archive_is_named(sample, tmp_path):
    hf = tmp_path / "hf/data"
    shutil.copytree(sample[0] / "hf/data", hf)
    part = hf / "train_images_1.tar.gz"
    part.write_bytes(part.read_bytes()[:-100])
    r = subprocess.run(CLI + ["--imagenet-root", str(tmp_path / "hf"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{part}: unreadable or truncated" in r.stderr and "Traceback" not in r.stderr


def test_a_killed_hugging_face_run_resumes_to_the_same_bytes(sample, tmp_path):
    out = tmp_path / "k"
    args = ["--imagenet-root", str(sample[0] / "hf"), "--out", str(out), "--shard-size", "5", "--workers", "1"]
    held_prep(args, out, "units").kill()
    assert subprocess.run(PREP + args, capture_output=True).returncode == 0
    whole = tmp_path / "whole"
    run(PrepConfig(sample[0] / "hf", whole, shard_size=5, workers=1, progress=False))
    assert _files(out) == _files(whole)


def test_hugging_face_with_a_per_class_limit_keeps_the_same_images_as_folders(sample, tmp_path):
    for layout in ("extracted", "hf"):
        run(PrepConfig(sample[0] / layout, tmp_path / layout, shard_size=5, workers=1, limit_per_class=2,
                       progress=False))
    ours, theirs = _files(tmp_path / "hf"), _files(tmp_path / "extracted")
    assert {k: v for k, v in ours.items() if k.endswith((".tar", ".idx", ".npz"))} == \
           {k: v for k, v in theirs.items() if k.endswith((".tar", ".idx", ".npz"))}
    assert shards.load_manifest(tmp_path / "hf").splits["train"].samples < 15


def test_a_run_killed_before_its_plan_was_written_starts_again(prepped, sample, tmp_path):
    out = tmp_path / "o"
    (out / ".work").mkdir(parents=True)  # prep creates .work, then writes its plan: a kill in between
    run(PrepConfig(sample[0] / "extracted", out, shard_size=5, workers=1, progress=False))
    assert _files(out) == _files(prepped)


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """A sample with enough images per unit for a worker to be caught at work, and its clean shards."""
    root = tmp_path_factory.mktemp("larger")
    sample_maker.make(root / "sample", classes=2, train_per_class=70, val_per_class=2, seed=3,
                      layouts=("extracted",), workers=2)
    run(PrepConfig(root / "sample" / "extracted", root / "clean", shard_size=4, workers=1, progress=False))
    return root / "sample" / "extracted", root / "clean"


@pytest.mark.parametrize("stage", ["units", "shards"])
def test_a_killed_worker_stops_prep_with_one_line_and_the_rerun_gives_a_clean_runs_bytes(larger, tmp_path, stage):
    """Both workers held after their first unit (or shard); one is SIGKILLed (as the OOM killer would), the
    other then SIGTERMed from outside: the report names the first, by its signal and what it was doing."""
    source, clean = larger
    out = tmp_path / "o"
    args = ["--imagenet-root", str(source), "--out", str(out), "--shard-size", "4", "--workers", "2", "--no-progress"]
    proc = held_prep(args, out, stage, holders=2)
    victim, other = workers.held(out / WORK)
    busy = (out / WORK / f".busy-{victim}").read_text()
    os.kill(victim, signal.SIGKILL)
    os.kill(other, signal.SIGTERM)
    t0 = time.time()
    err = proc.communicate(timeout=60)[1]
    assert time.time() - t0 < 10 and proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines == [f"alexnet-prep: worker {victim} died (SIGKILL) while preparing {busy}; finished work is kept: "
                     "run the same command again to resume"], err
    assert busy.endswith(".tar") == (stage == "shards") and busy
    assert subprocess.run(PREP + args, capture_output=True).returncode == 0
    assert _files(out) == _files(clean)
    rerun = subprocess.run(PREP + args + ["--rebuild"], capture_output=True, text=True)  # nothing changed: same bytes
    assert rerun.returncode == 0 and _files(out) == _files(clean)


def test_a_multi_gib_file_is_skipped_unread_naming_its_size_and_memory_stays_flat(sample, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(sample[0] / "extracted", root, symlinks=True)
    wnid = sorted(p.name for p in (root / "train").iterdir())[1]
    huge = root / "train" / wnid / f"{wnid}_999999.JPEG"
    with open(huge, "wb") as f:  # sparse: 3 GiB of zeros that take no disk
        f.truncate(3 * 2**30)
    # VmHWM: this process's peak RSS since its exec (getrusage's maxrss would carry pytest's own across exec);
    # with one worker the images are read in this process
    measured = ("import re, sys; from alexnet_pipeline.cli import prep_main; rc = prep_main(sys.argv[1:]); "
                "print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", measured, "--imagenet-root", str(root), "--out", str(tmp_path / "o"),
                        "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.split("peak ")[1]) / 1024
    assert peak_mib < 400, peak_mib  # reading the file whole would take 3 GiB
    skipped = {s["source"]: s["reason"] for s in shards.load_manifest(tmp_path / "o").skipped}
    assert skipped[str(huge)].startswith("3,221,225,472 bytes, larger than any photograph (the limit is 256 MiB")
    assert "a file of zeros" in skipped[str(huge)]


def test_the_fingerprint_is_every_option_declared_to_shape_the_output(sample, tmp_path):
    """Changing any option declared recipe=True changes the fingerprint (a directory holding another run is
    refused); the others (workers, progress, rebuild, out) do not."""
    import dataclasses

    from alexnet_pipeline.config import recipe_fields

    base = PrepConfig(sample[0] / "extracted", tmp_path / "o")
    assert set(base.fingerprint()) == set(recipe_fields(PrepConfig)) | {"format_version"}
    changed = {"imagenet_root": sample[0] / "kaggle", "splits": ("train",), "shard_size": 7, "quality": 90,
               "image_size": 240, "seed": 3, "limit_per_class": 2, "layout": "folders", "max_image_mib": 9}
    assert set(changed) == set(recipe_fields(PrepConfig))
    for name, value in changed.items():
        assert dataclasses.replace(base, **{name: value}).fingerprint() != base.fingerprint(), name
    for name, value in {"workers": 2, "progress": True, "rebuild": True, "out": tmp_path / "other"}.items():
        assert dataclasses.replace(base, **{name: value}).fingerprint() == base.fingerprint(), name


# ---- at ImageNet's size: open files, reading order, memory, progress -------------------------------------

def _prep_code(setup: str) -> list[str]:
    """The prep command in a fresh interpreter, after `setup` (a line of Python)."""
    return [sys.executable, "-c", f"import sys; {setup}; from alexnet_pipeline.cli import prep_main; "
            "sys.exit(prep_main(sys.argv[1:]))"]


def test_a_shard_drawing_on_many_work_files_needs_few_open_files(prepped, sample, tmp_path):
    """Units of one image (as ImageNet's global shuffle makes a 1,000-sample shard draw on ~976 work files)
    into one shard, under a limit of 16 open files, soft and hard: the shard stage holds one work file at a
    time, so it finishes, with the bytes of any other run but for the unit size."""
    setup = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16)); "
             "from alexnet_pipeline.prep import imagenet; imagenet.FILES_PER_UNIT = 1")
    out = tmp_path / "o"
    r = subprocess.run(_prep_code(setup) + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out),
                                            "--workers", "1", "--shard-size", "100", "--splits", "train"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage train work files: 34 files" in r.stdout  # 34 units of one image each
    whole = tmp_path / "whole"
    run(PrepConfig(sample[0] / "extracted", whole, splits=("train",), shard_size=100, workers=1, progress=False))
    assert _files(out) == _files(whole)


def test_out_of_open_files_is_one_line_exit_1_and_the_same_command_resumes(sample, tmp_path):
    setup = ("import errno; from alexnet_pipeline.prep import workfiles; "
             "workfiles.read_jpegs = lambda path, spans: (_ for _ in ()).throw("
             "OSError(errno.EMFILE, 'Too many open files', path))")
    out = tmp_path / "o"
    args = ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), "--workers", "1", "--shard-size", "5"]
    r = subprocess.run(_prep_code(setup) + args, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert ".unit: too many open files" in lines[0] and "ulimit -n" in lines[0] and "resume" in lines[0]
    assert subprocess.run(PREP + args, capture_output=True).returncode == 0
    whole = tmp_path / "whole"
    run(PrepConfig(sample[0] / "extracted", whole, shard_size=5, workers=1, progress=False))
    assert _files(out) == _files(whole)


def test_the_shard_stage_reads_every_work_file_front_to_back(sample, tmp_path, monkeypatch):
    """Every read of a work file, over the whole shard stage, is at a larger offset than the last read of that
    file: a disk or NFS server serves each file as one forward stream."""
    from alexnet_pipeline.prep import imagenet, workfiles

    monkeypatch.setattr(imagenet, "FILES_PER_UNIT", 5)  # several work files per shard and shards per file
    reads, real = [], workfiles.read_jpegs
    monkeypatch.setattr(workfiles, "read_jpegs", lambda path, spans: reads.append((path, spans)) or real(path, spans))
    run(PrepConfig(sample[0] / "extracted", tmp_path / "o", shard_size=4, workers=1, progress=False))
    last: dict[str, int] = {}
    for path, spans in reads:
        for offset, _ in spans:
            assert offset > last.get(path, -1), (path, offset, last.get(path))
            last[path] = offset
    n_shards = sum(len(e.shards) for e in shards.load_manifest(tmp_path / "o").splits.values())
    assert len(reads) > n_shards and len({p for p, _ in reads}) < len(reads)  # files shared by several shards


_checks: list = []  # [where to note the checking process, the real check]


def _noting_check(path):
    """command._intact, noting which process runs it (by name, so that the pool can send it to its workers)."""
    with open(_checks[0], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _checks[1](path)


def test_a_resume_checks_the_work_files_in_the_workers(larger, tmp_path, monkeypatch):
    from alexnet_pipeline.prep import command

    source, clean = larger
    out = tmp_path / "o"
    args = ["--imagenet-root", str(source), "--out", str(out), "--shard-size", "4", "--workers", "2", "--no-progress"]
    held_prep(args, out, "shards").kill()  # killed in the shard stage: every train work file is there
    checked = tmp_path / "checked"
    monkeypatch.setattr(sys.modules[__name__], "_checks", [checked, command._intact])
    monkeypatch.setattr(command, "_intact", _noting_check)
    run(PrepConfig(source, out, shard_size=4, workers=2, progress=False))
    pids = checked.read_text().split()
    assert len(pids) == 3  # 140 train images: 3 units of 64 (the last of 12)
    assert str(os.getpid()) not in pids
    assert _files(out) == _files(clean)


def test_progress_lines_when_stderr_is_not_a_terminal(sample, tmp_path):
    r = subprocess.run(PREP + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(tmp_path / "o"),
                               "--workers", "1", "--progress-every", "0.01"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("train images: ")]
    assert lines and all(re.fullmatch(r"train images: [\d,]+/34 images \(\d+%\), [\d,]+ images/s(, \S+ left)?", line)
                         for line in lines), r.stderr
    quiet = subprocess.run(PREP + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(tmp_path / "q"),
                                   "--workers", "1", "--no-progress"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("damage", ["short", "flipped"])
def test_a_resume_redoes_a_work_file_a_crash_left_short_or_damaged_and_leaves_no_temporary_file(
        larger, tmp_path, damage):
    """Work files are not fsynced: after a crash one may be short, or hold wrong bytes under an intact
    trailer. The resumed run redoes it (its CRC) and ends with a clean run's bytes, and no temporary file of
    the killed run is left anywhere in OUT, dot-files included."""
    source, clean = larger
    out = tmp_path / "o"
    args = ["--imagenet-root", str(source), "--out", str(out), "--shard-size", "4", "--workers", "1", "--no-progress"]
    held_prep(args, out, "shards").kill()  # every train work file is on disk, a shard too
    victim = sorted((out / WORK / "train").glob("*.unit"))[1]
    data = bytearray(victim.read_bytes())
    if damage == "short":
        victim.write_bytes(bytes(data[:len(data) // 2]))
    else:
        data[100] ^= 0xFF  # inside the first JPEG; the trailer (and its CRC) untouched
        victim.write_bytes(bytes(data))
    for stray in (out / ".dataset.json.tmp4242", out / WORK / "train" / f".{victim.name}.tmp4242",
                  out / "train" / ".train-000003.tar.tmp4242"):
        stray.write_bytes(b"half-written")
    r = subprocess.run(PREP + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "stage train images: 64 images" in r.stdout  # that unit, and only it, was prepared again
    assert _files(out) == _files(clean)
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []


def test_a_run_killed_among_its_units_checks_the_work_files_it_finds_too(larger, tmp_path):
    """Not only a resume after every unit was done: one killed in the units stage checks the work files it
    finds (one holds wrong bytes under an intact trailer), redoes that one and ends with a clean run's bytes."""
    source, clean = larger
    out = tmp_path / "o"
    args = ["--imagenet-root", str(source), "--out", str(out), "--shard-size", "4", "--workers", "1", "--no-progress"]
    held_prep(args, out, "units").kill()  # one process, one unit done: the others not yet
    victim, = (out / WORK).rglob("*.unit")
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = subprocess.run(PREP + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(clean)


def test_prep_raises_its_soft_open_file_limit_to_the_hard_one(sample, tmp_path):
    setup = ("import resource; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
             "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)); import atexit; "
             "atexit.register(lambda: print('soft', resource.getrlimit(resource.RLIMIT_NOFILE)[0]))")
    r = subprocess.run(_prep_code(setup) + ["--imagenet-root", str(sample[0] / "extracted"), "--out",
                                            str(tmp_path / "o"), "--workers", "1", "--splits", "val"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import resource

    assert int(r.stdout.split("soft ")[1]) == resource.getrlimit(resource.RLIMIT_NOFILE)[1] > 64


def test_a_flat_val_image_missing_from_the_labels_is_skipped_never_labelled(sample, tmp_path):
    root = tmp_path / "k"
    shutil.copytree(sample[0] / "kaggle", root)
    val = root / "ILSVRC/Data/CLS-LOC/val"
    extra = val / "ILSVRC2012_val_99999999.JPEG"
    extra.write_bytes(sorted(val.glob("*.JPEG"))[0].read_bytes())
    report = run(PrepConfig(root, tmp_path / "o", splits=("val",), workers=1, progress=False))
    assert {Path(s["source"]).name: s["reason"] for s in report.skipped}[extra.name] == "no label for this image"
    assert "ILSVRC2012_val_99999999" not in read_samples(tmp_path / "o", "val")
    assert min(label for label, _ in read_samples(tmp_path / "o", "val").values()) >= 0


def test_the_samples_of_every_unit_are_collected_and_a_key_seen_twice_is_kept_once(tmp_path):
    """More units than one task takes (64): none is lost at a task's edge; a key found in two units (the same
    image in two folders) is kept from the first and the second named as skipped."""
    from alexnet_pipeline.prep import command, units, workfiles

    work = tmp_path / WORK
    planned = [units.FolderUnit("train", f"train/u{k:03d}") for k in range(130)]
    for k, unit in enumerate(planned):
        path = command._unit_path(work, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = [f"s{k}", "twice"] if k in (5, 70) else [f"s{k}"]
        workfiles.write(path, [b"\xff\xd8"] * len(keys), {"keys": keys, "labels": [k % 7] * len(keys),
                                                          "skipped": []}, None)
    samples, _, skipped, _ = command._collect(planned, work, 1, workers.Serial())
    assert sorted(r.key for r in samples) == sorted([f"s{k}" for k in range(130)] + ["twice"])
    assert [(s["source"], s["reason"]) for s in skipped] == [
        ("train/u070:twice", "duplicate sample key (kept the one from train/u005)")]


def test_the_samples_are_collected_in_the_splits_order_whatever_the_units_order(tmp_path):
    """Val's units (class folders of the Kaggle layout, say) interleave its keys: the split is in key order
    all the same. Train's rows follow their order keys, ties by key."""
    from alexnet_pipeline.prep import command, units, workfiles

    work = tmp_path / WORK
    keys = {"val": [["v3", "v1"], ["v2", "v0", "v4"]], "train": [["t3", "t1"], ["t2", "t0", "t4"]]}
    planned = {split: [units.FolderUnit(split, f"{split}/u{k}") for k in range(2)] for split in keys}
    for split, unit_keys in keys.items():
        for unit, ks in zip(planned[split], unit_keys, strict=True):
            path = command._unit_path(work, unit)
            path.parent.mkdir(parents=True, exist_ok=True)
            workfiles.write(path, [b"\xff\xd8"] * len(ks), {"keys": ks, "labels": [0] * len(ks), "skipped": []},
                            None)
    val = command._collect(planned["val"], work, 1, workers.Serial())[0]
    assert [r.key for r in val] == ["v0", "v1", "v2", "v3", "v4"]
    train = command._collect(planned["train"], work, 1, workers.Serial())[0]
    assert [r.order for r in train] == sorted(r.order for r in train) and sorted(r.key for r in train) == \
        ["t0", "t1", "t2", "t3", "t4"] and [r.key for r in train] != sorted(r.key for r in train)


@pytest.mark.parametrize("splits", [(), ("train", "train"), ("val", "train", "val")])
def test_no_split_or_a_split_named_twice_is_refused_naming_the_option(tmp_path, splits):
    from alexnet_pipeline.config import OptionError

    with pytest.raises(OptionError, match="option splits"):
        PrepConfig(imagenet_root=tmp_path, out=tmp_path / "out", splits=splits)
