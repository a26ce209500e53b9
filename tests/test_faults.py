"""Nothing stale, nothing garbled, no traceback: each defect of the fault review, by the test that covers it.
(The checkpoint's and the run directory's are in test_checkpoint.py and test_rundir.py.)"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_samples, sample_maker
from PIL import Image

from alexnet_pipeline import files, shards, verified
from alexnet_pipeline.config import UserError
from alexnet_pipeline.image import BadImage, decode_rgb
from alexnet_pipeline.prep import PrepConfig, PrepError, listing, run

PREP = [sys.executable, "-c", "import sys; from alexnet_pipeline.cli import prep_main; sys.exit(prep_main())"]
TRAIN = [sys.executable, "-c", "import sys; from alexnet_pipeline.cli import train_main; sys.exit(train_main())"]


def _tree(root: Path, sample, per_class: int = 3) -> Path:
    """Two classes of the sample's real images, train and val."""
    src = sample[0] / "extracted"
    for split, n in (("train", per_class), ("val", 1)):
        for wnid in sorted(p.name for p in (src / split).iterdir())[:2]:
            (root / split / wnid).mkdir(parents=True)
            for f in sorted((src / split / wnid).glob("*_[0-8]*.JPEG"))[:n]:
                shutil.copy2(f, root / split / wnid / f.name)
    return root


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ---- a finished output remembers its source --------------------------------------------------------------

def test_a_rerun_over_a_changed_source_refuses_naming_the_change_and_rebuild_rebuilds(sample, tmp_path):
    root, out = _tree(tmp_path / "r", sample), tmp_path / "o"
    args = PREP + ["--imagenet-root", str(root), "--out", str(out), "--workers", "1"]
    assert subprocess.run(args, capture_output=True).returncode == 0
    same = subprocess.run(args, capture_output=True, text=True)
    assert same.returncode == 0 and "nothing to do" in same.stdout
    first = sorted((root / "train").iterdir())[0]
    victim = sorted(first.iterdir())[0]
    shutil.copy2(victim, first / "added_1.JPEG")
    (sorted(first.iterdir())[-1]).unlink()
    victim.write_bytes(victim.read_bytes() + b"\0")  # a changed file: size and time
    line = _one_line(subprocess.run(args, capture_output=True, text=True))
    assert "1 added, 1 removed, 1 changed" in line and "added_1.JPEG" in line and "--rebuild" in line
    assert not (out / ".work").exists() and shards.verify(out) == []  # the old output is untouched
    rebuilt = subprocess.run(args + ["--rebuild"], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "added_1" in read_samples(out, "train")
    assert subprocess.run(args, capture_output=True, text=True).stdout.count("nothing to do") == 1
    # an edit that keeps the size (a re-encoded image, a corrected pixel) changes only the modification time
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    kept = victim.stat()
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(kept.st_atime_ns, kept.st_mtime_ns + 10**9))
    line = _one_line(subprocess.run(args, capture_output=True, text=True))
    assert "0 added, 0 removed, 1 changed" in line and victim.name in line


def test_a_resume_over_a_changed_source_says_what_changed(sample, tmp_path):
    root, out = _tree(tmp_path / "r", sample), tmp_path / "o"
    cfg = PrepConfig(root, out, workers=1, progress=False)
    run(cfg)
    (out / shards.MANIFEST).unlink()  # as if killed before the end: the work files and plan remain...
    (out / ".work").mkdir()
    listing.write(out / ".work", listing.Listing([listing.Folder("train", 1, b"gone.JPEG\0" + b"1\0" + b"1\0")]))
    (out / ".work" / "plan.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "source": "x"}))
    with pytest.raises(PrepError, match=r"changed since .* was started \(\d+ added, 1 removed"):
        run(cfg)


# ---- readers check what they can afford to ---------------------------------------------------------------

def test_a_same_size_edit_is_named_at_loader_start_and_a_copy_without_times_is_rehashed_once_then_trusted(
        prepped, tmp_path, monkeypatch):
    from alexnet_pipeline.pipeline import train_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)  # times kept: the stat cache (a dot-file, copied too) trusts every shard
    shard = shards.shard_paths(copy, "train")[0]
    data = bytearray(shard.read_bytes())
    first = shard.with_suffix(".idx").read_text().splitlines()[1].split()
    at = int(first[first.index("cls") + 1])  # the first label's digit (its offset from the index), same size
    digit = data[at:at + 1]
    assert digit.isdigit() and int(digit) == next(shards.iter_samples(bytes(data))).label
    data[at:at + 1] = b"3" if digit != b"3" else b"2"
    shard.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match=f"{shard}: its bytes differ from dataset.json"):
        train_loader(copy, batch_size=4, num_threads=1)
    assert any("sha256 differs" in p for p in shards.verify(copy))

    hashed, real = [], verified.file_sha256
    monkeypatch.setattr(verified, "file_sha256", lambda path: hashed.append(path) or real(path))
    faithful = tmp_path / "t"
    shutil.copytree(prepped, faithful, copy_function=shutil.copyfile)  # a copy that did not keep times
    n_shards = len(shards.shard_paths(faithful, "train"))
    verified.readable_split(faithful, "train")
    assert len(hashed) == n_shards  # re-hashed once...
    hashed.clear()
    verified.readable_split(faithful, "train")
    assert hashed == []  # ...then trusted
    assert next(iter(train_loader(faithful, batch_size=4, num_threads=1)))[0].shape[0] == 4


def test_bit_rot_that_keeps_size_and_time_is_named_during_the_first_epoch(prepped, tmp_path):
    """256 bytes flipped inside JPEGs of one shard, its size and time kept (a failing disk): the loader start
    trusts it (the stat cache), and the background digest names it before the first epoch ends."""
    from alexnet_pipeline.pipeline import train_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    shard = shards.shard_paths(copy, "train")[1]
    data, kept = bytearray(shard.read_bytes()), shard.stat()
    for start in [i for i in range(len(data) - 4) if data[i:i + 3] == b"\xff\xd8\xff"][:3]:
        at = start + 2000  # inside the entropy-coded data: decoders warn, or decode garbage, and go on
        data[at:at + 256] = bytes(b ^ 0x55 for b in data[at:at + 256])
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    loader = train_loader(copy, batch_size=4, num_threads=1)
    with pytest.raises(shards.ShardError, match=f"{shard}: its bytes differ .* size and time did not change"):
        for _ in loader:
            pass
    assert loader.epoch == 0  # named inside the first epoch
    problems = shards.verify(copy)
    assert any(f"{shard}: size or sha256 differs" in p for p in problems)
    assert not any("samples, dataset.json says" in p for p in problems)  # the damaged shard's samples counted


NAN_IN = ["mean_rgb", "std_rgb", "mean_image", "cov", "eigval", "eigvec"]  # every float array of stats.npz


@pytest.mark.parametrize("damage,named", [*((f"nan:{k}", f"{k} is not finite") for k in NAN_IN),
                                          ("mean", "mean_rgb is outside 0-255"), ("eigvec", "not orthonormal"),
                                          ("negative", "not positive")])
def test_statistics_that_are_not_finite_or_consistent_are_named(prepped, tmp_path, damage, named):
    from alexnet_pipeline.pipeline import train_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    stats = shards.load_stats(copy)
    if damage.startswith("nan:"):
        stats[damage[4:]].flat[1] = np.nan  # NaN also passes a 0-255 range test: only the finite check sees it
    elif damage == "mean":
        stats["mean_rgb"][0] = 300.0
    elif damage == "eigvec":
        stats["eigvec"][:, 0] *= 2
    else:
        stats["eigval"][2] = -1.0
    shards.save_npz(copy / shards.STATS, stats)
    assert any(named in p for p in shards.verify(copy))
    with pytest.raises(shards.ShardError, match=f"stats.npz: .*{named}"):
        train_loader(copy, batch_size=4, num_threads=1)


def test_a_manifest_from_a_newer_version_is_refused_naming_it(prepped, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    manifest = json.loads((copy / shards.MANIFEST).read_text())
    manifest["format_version"] = shards.FORMAT_VERSION + 1
    (copy / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match=f"newer alexnet-prep \\(format {shards.FORMAT_VERSION + 1}"):
        shards.load_manifest(copy)
    r = subprocess.run(TRAIN + ["--shards", str(copy), "--out", str(tmp_path / "run"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert "newer alexnet-prep" in _one_line(r)


# ---- one writer per directory ----------------------------------------------------------------------------

def test_a_second_prep_into_the_same_out_is_refused_naming_the_holder(sample, tmp_path):
    root, out = _tree(tmp_path / "r", sample), tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alexnet_pipeline.files import "
                               "DirectoryLock; DirectoryLock(sys.argv[1], 'x').acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_line(subprocess.run(PREP + ["--imagenet-root", str(root), "--out", str(out)],
                                        capture_output=True, text=True))
        assert f"in use by another alexnet-prep (pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is gone with it
    assert subprocess.run(PREP + ["--imagenet-root", str(root), "--out", str(out), "--workers", "1"],
                          capture_output=True).returncode == 0
    assert not (out / files.LOCK).exists()


def test_the_lock_refuses_a_second_holder_in_the_same_process_and_frees_on_release(tmp_path):
    first = files.DirectoryLock(tmp_path, "alexnet-train").acquire()
    with pytest.raises(UserError, match=f"in use by another alexnet-train \\(pid {os.getpid()}\\)"):
        files.DirectoryLock(tmp_path, "alexnet-train").acquire()
    first.release()
    with files.DirectoryLock(tmp_path, "alexnet-train"):
        pass


# ---- every value is checked before work starts -----------------------------------------------------------

@pytest.mark.parametrize("flag,value,named", [("--seed", "-1", "option seed: must be at least 0"),
                                              ("--workers", "-2", "option workers"),
                                              ("--quality", "0", "option quality"),
                                              ("--splits", "train,test", "option splits"),
                                              ("--limit-per-class", "0", "option limit_per_class")])
def test_prep_options_are_checked_before_any_image_is_read(sample, tmp_path, flag, value, named):
    out = tmp_path / "o"
    r = subprocess.run(PREP + ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), flag, value],
                       capture_output=True, text=True)
    assert named in _one_line(r) and not out.exists()


def test_a_file_name_that_is_not_utf8_is_carried_through_encoded(sample, tmp_path):
    root = _tree(tmp_path / "r", sample)
    wnid_dir = sorted((root / "train").iterdir())[0]
    src = sorted(wnid_dir.iterdir())[0]
    odd = os.fsdecode(b"caf\xe9_\xff1.JPEG")  # Latin-1 bytes: not valid UTF-8
    os.rename(src, wnid_dir / odd)
    out = tmp_path / "o"
    r = subprocess.run(PREP + ["--imagenet-root", str(root), "--out", str(out), "--workers", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "caf%E9_%FF1" in read_samples(out, "train")
    assert shards.verify(out) == []


# ---- decoding is right, or the reason is -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_grey_images_of_every_mode_become_8_bits(mode):
    """16-bit ('I;16') and 32-bit integer ('I') images by value >> 8, float ('F') images clipped to 0-255."""
    ramp = np.arange(256 * 256).reshape(256, 256)
    if mode == "F":
        array, expected = (ramp / 200.0).astype(np.float32), np.clip(ramp / 200.0, 0, 255).astype(np.uint8)
    else:
        array, expected = ramp.astype(np.uint16 if mode == "I;16" else np.int32), (ramp >> 8).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    pixels = np.asarray(decode_rgb(buf.getvalue(), 256))
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped():
    ramp = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    pixels = np.asarray(decode_rgb(buf.getvalue(), 256))
    np.testing.assert_array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
    assert pixels.mean() == pytest.approx(127.5, abs=0.5)  # PIL's own conversion makes this nearly all 255


@pytest.mark.parametrize("data,reason", [
    (b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 32, "a WebP image, which this PIL build"),
    (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not an image (HTML page)"),
    (b"PK\x03\x04" + b"\x00" * 40, "not an image (ZIP archive)"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "a damaged JPEG"),
    (sample_maker.quirk_bytes("truncated", np.random.default_rng(0), 4), "cannot decode this JPEG")])
def test_a_file_that_is_not_a_decodable_image_is_skipped_naming_its_real_format(data, reason):
    with pytest.raises(BadImage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_rgb(data, 256)


def test_a_file_where_a_class_folder_belongs_is_reported(sample, tmp_path):
    root = _tree(tmp_path / "r", sample)
    (root / "train" / "README.txt").write_text("downloaded from ...")
    report = run(PrepConfig(root, tmp_path / "o", workers=1, progress=False))
    listed = [s for s in report.skipped if s["source"].endswith("README.txt")]
    assert listed and "a file where a class folder belongs" in listed[0]["reason"]
    assert listed == [s for s in shards.load_manifest(tmp_path / "o").skipped if s["source"].endswith("README.txt")]


def test_a_skipped_file_whose_name_is_not_utf8_prints_escaped(sample, tmp_path):
    """Its name is printed in the summary; in a strict UTF-8 output that must not stop prep with a traceback."""
    root = _tree(tmp_path / "r", sample)
    (sorted((root / "train").iterdir())[0] / os.fsdecode(b"caf\xe9.JPEG")).write_bytes(b"")
    r = subprocess.run(PREP + ["--imagenet-root", str(root), "--out", str(tmp_path / "o"), "--workers", "1"],
                       capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"caf\\udce9.JPEG: empty file" in r.stdout


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """A full disk or a signal inside atomic_write: the file keeps its old bytes and nothing half-written is
    left beside it (not even the dot-file a later sweep would find)."""
    target = tmp_path / "dataset.json"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"half of it")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.atomic_write(target, half)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]
