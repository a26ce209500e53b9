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

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
STATS = "stats.npz"
LABEL_EXT = "lbl"


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
    count = int(path.with_suffix(".idx").read_text().split("\n", 1)[0].split()[1])
    return ShardInfo(path.name, count, len(data), hashlib.sha256(data).hexdigest())


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
    """The parsed dataset.json of a shards directory, with a clear error if it is missing or unreadable."""
    path = Path(shards) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is this a directory written by alexnet-prep?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def shard_paths(shards: Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The tar shards of `split`, in manifest order."""
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(shards) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [Path(shards) / split / s["name"] for s in manifest["splits"][split]["shards"]]


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
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = []
    n_classes, size = len(manifest["classes"]), manifest["image_size"]
    if not (shards / STATS).exists() and "train" in manifest["splits"]:
        problems.append(f"{shards / STATS}: missing")
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
