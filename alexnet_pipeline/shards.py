"""Shards on disk: writing tar shards and their DALI index files, the manifest, and verification.

A sample is three tar members sharing a key: ``KEY.jpg`` (256x256 baseline RGB JPEG), ``KEY.cls`` (the label
as ASCII digits, the WebDataset convention) and ``KEY.lbl`` (the same label as 8 little-endian bytes, int64,
because DALI's webdataset reader batches fixed-size members without any parsing). We write the tar bytes
ourselves (ustar headers, mtime 0, owner 0) so that the same samples always give the same bytes, and the
index in the format of DALI's ``wds2idx`` (v1.2) from the offsets we just wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import UserError

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
STATS = "stats.npz"
TIMM_INFO = "_info.json"  # how timm's WebDataset reader (timm.data.readers.reader_wds) finds the shards
TIMM_SPLITS = {"train": "train", "val": "validation"}  # our split -> timm's name for it
LABEL_EXT = "lbl"
MAX_KEY = 100 - len(".jpg")  # a ustar member name holds 100 bytes; every member is KEY plus a 3-letter extension


class ShardError(UserError, ValueError):
    """A shards directory (or one of its files) that cannot be read as it is; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    """One written shard, as recorded in dataset.json."""

    name: str
    samples: int
    bytes: int
    sha256: str


def atomic_write(path: Path, data) -> None:
    """Write `data` (bytes, or a function that writes to an open binary file) to `path` so that readers see
    either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # the pattern remove_partials sweeps
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)  # e.g. torch.save, without holding the whole file in memory first
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def remove_partials(directory: Path) -> int:
    """Delete the temporary files a killed `atomic_write` left under `directory`; returns how many."""
    partials = [p for p in Path(directory).rglob(".*.tmp*") if p.is_file()]
    for p in partials:
        p.unlink()
    return len(partials)


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header + data + padding) with fixed metadata, so bytes depend on content only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def sample_members(key: str, jpeg: bytes, label: int) -> list[tuple[str, bytes]]:
    """The members of one sample, in the order they are written."""
    return [(f"{key}.jpg", jpeg), (f"{key}.cls", str(label).encode()),
            (f"{key}.{LABEL_EXT}", int(label).to_bytes(8, "little", signed=True))]


def build_shard(samples) -> tuple[bytes, str]:
    """Tar bytes and wds2idx-format index text for `samples`, an iterable of (key, jpeg, label)."""
    buf, lines, offset = io.BytesIO(), [], 0
    for key, jpeg, label in samples:
        parts = []
        for name, data in sample_members(key, jpeg, label):
            member = tar_member(name, data)
            buf.write(member)
            # the data starts after the 512-byte header, which is where the index points
            parts.append(f"{name.split('.', 1)[1]} {offset + tarfile.BLOCKSIZE} {len(data)} {name}")
            offset += len(member)
        lines.append(" ".join(parts))
    buf.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    index = f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)
    return buf.getvalue(), index


def write_shard(path: Path, samples) -> ShardInfo:
    """Write a shard and its index; the index lands first, so a visible .tar always has its .idx."""
    data, index = build_shard(samples)
    atomic_write(path.with_suffix(".idx"), index.encode())
    atomic_write(path, data)
    return ShardInfo(path.name, index.count("\n") - 1, len(data), hashlib.sha256(data).hexdigest())


def describe_shard(path: Path) -> ShardInfo:
    """ShardInfo of a shard already on disk (used when a resumed run finds it finished)."""
    data = path.read_bytes()
    return ShardInfo(path.name, index_extent(path.with_suffix(".idx"))[0], len(data), hashlib.sha256(data).hexdigest())


def index_extent(idx: Path) -> tuple[int, int]:
    """(samples, end of the last member's data) of a wds2idx index file."""
    try:
        lines = idx.read_text().rstrip("\n").split("\n")
        version, count = lines[0].split()
        last = lines[-1].split()
        if version != "v1.2" or int(count) != len(lines) - 1 or len(last) < 4:
            raise ValueError
        return int(count), int(last[-3]) + int(last[-2])
    except FileNotFoundError:
        raise ShardError(f"{idx}: index missing (alexnet-prep writes it next to the shard)") from None
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ShardError(f"{idx}: not an index file (alexnet-prep --verify checks everything)") from None


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so equal arrays give equal bytes; written atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arrays[name]), allow_pickle=False)
    atomic_write(path, buf.getvalue())


def load_manifest(shards: Path) -> dict:
    """The parsed dataset.json of a shards directory; ShardError if it is missing or unreadable."""
    path = Path(shards) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest; is this a directory written by alexnet-prep?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not {"classes", "splits", "image_size"} <= set(manifest):
        raise ShardError(f"{path}: not a manifest written by alexnet-prep")
    return manifest


def timm_info(manifest: dict) -> dict:
    """The contents of SHARDS/_info.json in timm's format: per split its name, sample count, shard file names
    (relative to SHARDS) and samples per shard. Our shards hold `jpg` and `cls` members, which is what timm
    reads by default."""
    return {"name": f"imagenet-{len(manifest['classes'])} (alexnet-pipeline)", "num_classes": len(manifest["classes"]),
            "splits": {TIMM_SPLITS[split]: {"name": TIMM_SPLITS[split], "num_samples": entry["samples"],
                                            "filenames": [f"{split}/{s['name']}" for s in entry["shards"]],
                                            "shard_lengths": [s["samples"] for s in entry["shards"]]}
                       for split, entry in manifest["splits"].items()}}


def write_timm_info(shards: Path, manifest: dict) -> None:
    atomic_write(Path(shards) / TIMM_INFO, json.dumps(timm_info(manifest), indent=1).encode())


STATS_ARRAYS = ("mean_rgb", "std_rgb", "mean_image", "cov", "eigval", "eigvec", "n_pixels")


def load_stats(shards: Path) -> dict[str, np.ndarray]:
    """The arrays of SHARDS/stats.npz; ShardError naming the file if it is missing, empty or not ours."""
    path = Path(shards) / STATS
    if not path.is_file():
        raise ShardError(f"{path}: missing (alexnet-prep writes it with the train split)")
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ShardError(f"{path}: not a statistics file written by alexnet-prep ({e})") from None
    missing = [k for k in STATS_ARRAYS if k not in stats]
    if missing:
        raise ShardError(f"{path}: not a statistics file written by alexnet-prep (no {', '.join(missing)})")
    return stats


def shard_paths(shards: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The tar shards of `split`, in manifest order."""
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        raise ShardError(f"{Path(shards) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [Path(shards) / split / s["name"] for s in manifest["splits"][split]["shards"]]


def readable_split(shards: Path, split: str) -> tuple[list[Path], int, dict]:
    """Shard paths, sample count and manifest of a split, after the checks that turn what would hang or
    crash a reader (a missing, truncated or replaced shard; a missing or wrong index) into a ShardError."""
    manifest = load_manifest(shards)
    paths = shard_paths(shards, split, manifest)
    if not paths:
        raise ShardError(f"{Path(shards) / split}: no shards listed for {split}")
    for path, info in zip(paths, manifest["splits"][split]["shards"]):
        if not path.is_file():
            raise ShardError(f"{path}: shard missing")
        if path.stat().st_size != info["bytes"]:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {info['bytes']} "
                             "(truncated or replaced; alexnet-prep --verify checks everything)")
        count, end = index_extent(path.with_suffix(".idx"))
        if end > info["bytes"] or count != info["samples"]:
            raise ShardError(f"{path.with_suffix('.idx')}: does not describe {path.name} ({count} samples to byte "
                             f"{end}; {MANIFEST} says {info['samples']} in {info['bytes']} bytes)")
    return paths, manifest["splits"][split]["samples"], manifest


def damaged_shards(shards: Path, split: str) -> list[Path]:
    """The shards of `split` whose bytes no longer match the sha256 in the manifest (reads them all)."""
    manifest = load_manifest(shards)
    return [path for path, info in zip(shard_paths(shards, split, manifest), manifest["splits"][split]["shards"])
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]]


def iter_tar(data: bytes):
    """(name, bytes) of each regular member of an in-memory tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if m.isfile():
                yield m.name, tf.extractfile(m).read()


def iter_samples(data: bytes):
    """(key, jpeg bytes, label) of each sample of an in-memory shard, checking the member triple."""
    members = list(iter_tar(data))
    for i in range(0, len(members), 3):
        (jn, jpeg), (cn, cls), (ln, lbl) = members[i:i + 3]
        key = jn.split(".")[0]
        if (jn, cn, ln) != (f"{key}.jpg", f"{key}.cls", f"{key}.{LABEL_EXT}"):
            raise ValueError(f"members {jn}, {cn}, {ln} are not one sample's jpg, cls and {LABEL_EXT}")
        label = int(cls)
        if int.from_bytes(lbl, "little", signed=True) != label:
            raise ValueError(f"{cn} says {label} but {ln} disagrees")
        yield key, jpeg, label


def verify(shards: Path, check_images: bool = True) -> list[str]:
    """Re-read a shards directory and return its problems (empty if none), first problem first.

    Checks the manifest's shards exist with the recorded size and sha256, that each index equals the one
    the shard's bytes imply, sample counts, labels in range and consistent, and that every image decodes
    to a 256x256 RGB baseline JPEG.
    """
    from PIL import Image

    shards = Path(shards)
    try:
        manifest = load_manifest(shards)
    except ShardError as e:
        return [str(e)]
    problems = []
    n_classes, size = len(manifest["classes"]), manifest["image_size"]
    if "train" in manifest["splits"]:
        try:
            load_stats(shards)
        except ShardError as e:
            problems.append(str(e))
    info = shards / TIMM_INFO
    if not info.is_file() or json.loads(info.read_text()) != timm_info(manifest):
        problems.append(f"{info}: missing or does not match {MANIFEST}")
    for split, entry in manifest["splits"].items():
        total = 0
        for info in entry["shards"]:
            path = shards / split / info["name"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            data = path.read_bytes()
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                problems.append(f"{path}: size or sha256 differs from {MANIFEST} (corrupted or replaced)")
                continue
            try:
                samples = list(iter_samples(data))
            except (tarfile.TarError, ValueError) as e:
                problems.append(f"{path}: unreadable samples ({e})")
                continue
            idx = path.with_suffix(".idx")
            if not idx.exists() or idx.read_text() != build_shard(samples)[1]:
                problems.append(f"{idx}: missing or does not match its shard")
            if len(samples) != info["samples"]:
                problems.append(f"{path}: {len(samples)} samples, {MANIFEST} says {info['samples']}")
            for key, jpeg, label in samples:
                if not 0 <= label < n_classes:
                    problems.append(f"{path}: {key}: label {label} out of range")
                if check_images:
                    try:
                        im = Image.open(io.BytesIO(jpeg))
                        im.load()
                        ok = im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)
                        ok = ok and not im.info.get("progressive") and not im.info.get("progression")
                    except (OSError, SyntaxError, ValueError):
                        ok = False
                    if not ok:
                        problems.append(f"{path}: {key}.jpg: not a {size}x{size} baseline RGB JPEG")
            total += len(samples)
        if total != entry["samples"]:
            problems.append(f"{shards / split}: {total} samples, {MANIFEST} says {entry['samples']}")
    return problems
