"""Shards on disk: writing tar shards and their DALI index files, the manifest, and verification.

A sample is three tar members sharing a key: ``KEY.jpg`` (256x256 baseline RGB JPEG), ``KEY.cls`` (the label
as ASCII digits, the WebDataset convention) and ``KEY.lbl`` (the same label as 8 little-endian bytes, int64,
because DALI's webdataset reader batches fixed-size members without any parsing). We write the tar bytes
ourselves (ustar headers, mtime 0, owner 0) so that the same samples always give the same bytes, and the
index in the format of DALI's ``wds2idx`` (v1.2) from the offsets we just wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files, storage
from .config import UserError

# 2: class names, the source's digest; 3: no times in the manifest; 4: the train order is a seeded keyed hash of
# each key (prep.order_key: known when an image is prepared, so work files are read front to back), the source
# listing is listing.SOURCE and covers label and name files too
FORMAT_VERSION = 4
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
    sha256: str  # what identifies a shard: the manifest holds no machine's facts (times), so copies hash equal


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header + data + padding) with fixed metadata, so bytes depend on content only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


@dataclass(frozen=True)
class Sample:
    """One sample of a shard, as WebDataset sees it: tar members KEY.EXT that share a key. A new field is a
    new member: declared here, written by `members` and read back by `from_members`, nowhere else."""

    key: str  # the source file's stem, e.g. n01440764_10026 (no dots)
    jpeg: bytes  # 256x256 baseline RGB JPEG
    label: int  # index into the manifest's sorted classes

    def members(self) -> list[tuple[str, bytes]]:
        """The tar members, in the order they are written: jpg, cls (ASCII digits, WebDataset's convention)
        and lbl (8 bytes, int64 little-endian: DALI's reader batches fixed-size members without parsing)."""
        return [(f"{self.key}.jpg", self.jpeg), (f"{self.key}.cls", str(self.label).encode()),
                (f"{self.key}.{LABEL_EXT}", int(self.label).to_bytes(8, "little", signed=True))]

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> "Sample":
        """The sample of one key's members ({ext: bytes}); ValueError if they are not this format's or disagree."""
        if set(members) != {"jpg", "cls", LABEL_EXT}:
            raise ValueError(f"members {', '.join(f'{key}.{e}' for e in members)} are not one sample's jpg, cls and "
                             f"{LABEL_EXT}")
        label = int(members["cls"])
        if int.from_bytes(members[LABEL_EXT], "little", signed=True) != label:
            raise ValueError(f"{key}.cls says {label} but {key}.{LABEL_EXT} disagrees")
        return cls(key, members["jpg"], label)


def build_shard(samples) -> tuple[bytes, str]:
    """Tar bytes and wds2idx-format index text for `samples`, an iterable of Sample."""
    buf, lines, offset = io.BytesIO(), [], 0
    for sample in samples:
        parts = []
        for name, data in sample.members():
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
    files.atomic_write(path.with_suffix(".idx"), index.encode())
    files.atomic_write(path, data)
    return ShardInfo(path.name, index.count("\n") - 1, len(data), hashlib.sha256(data).hexdigest())


def describe_shard(path: Path) -> ShardInfo:
    """ShardInfo of a shard already on disk (used when a resumed run finds it finished)."""
    data = path.read_bytes()
    return ShardInfo(path.name, index_extent(path.with_suffix(".idx"))[0], len(data), hashlib.sha256(data).hexdigest())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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


def index_of(data) -> str:
    """The wds2idx index of a shard's bytes (what write_shard wrote beside it), by walking its ustar headers: a
    copy fetched from a store gets its index from the bytes just checked against the manifest. ValueError if
    the bytes are not a shard's tar."""
    view, at, key = memoryview(data), 0, None
    lines: list[str] = []
    parts: list[str] = []
    while at + tarfile.BLOCKSIZE <= len(view) and view[at] != 0:
        header = bytes(view[at:at + tarfile.BLOCKSIZE])
        name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        stem, _, ext = name.partition(".")
        if stem != key and parts:
            lines.append(" ".join(parts))
            parts = []
        key = stem
        parts.append(f"{ext} {at + tarfile.BLOCKSIZE} {size} {name}")
        at += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if parts:
        lines.append(" ".join(parts))
    if at > len(view):
        raise ValueError("the last member runs past the end")
    return f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class Index:
    """Where a shard's samples are, from its index: per sample (in shard order) the JPEG's offset and size, and
    the offset of its 8-byte label."""

    jpg_offsets: np.ndarray
    jpg_sizes: np.ndarray
    label_offsets: np.ndarray

    def labels(self, data: np.ndarray) -> np.ndarray:
        """The labels (int64) read from the shard's bytes `data` (uint8) at label_offsets."""
        at = self.label_offsets[:, None] + np.arange(8)
        return np.ascontiguousarray(data[at]).view("<i8").reshape(-1)


def read_index(idx: Path, info: ShardInfo) -> Index:
    """The Index of a shard from its index file, checked against the shard's ShardInfo (its sample count, and
    every member inside its bytes); ShardError naming the file if it is not one of ours or does not fit."""
    try:  # a loader reads one per shard it opens: the numbers taken by slicing the words (1.5 ms per 1,000)
        words = Path(idx).read_bytes().split()
        version, count = words[0], int(words[1])
        exts = words[2::4]  # per member: ext, offset, size, name
        members = len(exts) // count
        if version != b"v1.2" or len(words) != 2 + 4 * count * members or exts != exts[:members] * count:
            raise ValueError
        jpg, lbl = exts.index(b"jpg"), exts.index(LABEL_EXT.encode())
        numbers = np.stack([np.array(words[3::4], np.int64), np.array(words[4::4], np.int64)], 1)
        numbers = numbers.reshape(count, members, 2)
    except FileNotFoundError:
        raise ShardError(f"{idx}: index missing (alexnet-prep writes it next to the shard)") from None
    except (ValueError, IndexError, ZeroDivisionError, OSError):
        raise ShardError(f"{idx}: not an index file of alexnet-prep's shards") from None
    if count != info.samples or numbers.size and (numbers[:, :, 0] + numbers[:, :, 1]).max() > info.bytes or \
            (numbers[:, lbl, 1] != 8).any():
        raise ShardError(f"{idx}: does not describe {info.name} ({count} samples; {MANIFEST} says {info.samples} "
                         f"in {info.bytes} bytes)")
    return Index(numbers[:, jpg, 0].copy(), numbers[:, jpg, 1].copy(), numbers[:, lbl, 0].copy())


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so equal arrays give equal bytes; written atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arrays[name]), allow_pickle=False)
    files.atomic_write(path, buf.getvalue())


@dataclass
class SplitInfo:
    """One split in dataset.json: its sample count and its shards, in reading order."""

    samples: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    """SHARDS/dataset.json: what prep wrote and how (docs/design.md, "Shards on disk")."""

    format_version: int
    image_size: int
    jpeg_quality: int
    classes: list[str]  # sorted wnids: a label is an index into this list
    class_names: dict[str, str]  # the names prep found beside the images (class_names() fills the rest)
    layout: dict[str, str]  # per split, the layout prep read
    splits: dict[str, SplitInfo]
    skipped: list[dict]  # {"split", "source", "reason"} of every file left out
    fingerprint: dict  # the options that shaped the bytes (PrepConfig.fingerprint)
    source: dict  # {"files", "sha256"} of the source listing
    created_by: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "Manifest":
        """A manifest from its JSON (older versions' extra keys, like the shards' times, are left out)."""
        known = {f.name for f in dataclasses.fields(ShardInfo)}
        splits = {name: SplitInfo(entry["samples"], [ShardInfo(**{k: v for k, v in s.items() if k in known})
                                                        for s in entry["shards"]])
                  for name, entry in raw["splits"].items()}
        return cls(raw["format_version"], raw["image_size"], raw.get("jpeg_quality", 95), raw["classes"],
                   raw.get("class_names") or {}, raw.get("layout") or {}, splits, raw.get("skipped", []),
                   raw.get("fingerprint", {}), raw.get("source", {}), raw.get("created_by", ""))


def load_manifest(shards) -> Manifest:
    """The dataset.json of a shards directory (or of its URL in a store); ShardError if it is missing or
    unreadable."""
    path = storage.join(shards, MANIFEST)
    try:
        raw = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest; is this a directory written by alexnet-prep?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not {"classes", "splits", "image_size"} <= set(raw):
        raise ShardError(f"{path}: not a manifest written by alexnet-prep")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShardError(f"{path}: written by a newer alexnet-prep (format {version}; this version reads up to "
                         f"{FORMAT_VERSION}); upgrade alexnet-pipeline")
    try:
        return Manifest.from_json(raw)
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a manifest written by alexnet-prep (no {e})") from None


def write_manifest(shards: Path, manifest: Manifest) -> None:
    files.atomic_write(Path(shards) / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())


def class_names(manifest: Manifest) -> dict[str, str]:
    """wnid -> human-readable name for the manifest's classes: the names prep found beside the images (the
    devkit, Kaggle's synset mapping), else the ILSVRC-2012 table shipped in the package; a class in neither
    is named by its wnid."""
    from .classnames import ilsvrc2012

    found, table = manifest.class_names, ilsvrc2012()
    return {w: found.get(w) or table.get(w) or w for w in manifest.classes}


def timm_info(manifest: Manifest) -> dict:
    """The contents of SHARDS/_info.json in timm's format: per split its name, sample count, shard file names
    (relative to SHARDS) and samples per shard. Our shards hold `jpg` and `cls` members, which is what timm
    reads by default."""
    return {"name": f"imagenet-{len(manifest.classes)} (alexnet-pipeline)", "num_classes": len(manifest.classes),
            "splits": {TIMM_SPLITS[split]: {"name": TIMM_SPLITS[split], "num_samples": entry.samples,
                                            "filenames": [f"{split}/{s.name}" for s in entry.shards],
                                            "shard_lengths": [s.samples for s in entry.shards]}
                       for split, entry in manifest.splits.items()}}


def write_timm_info(shards: Path, manifest: Manifest) -> None:
    files.atomic_write(Path(shards) / TIMM_INFO, json.dumps(timm_info(manifest), indent=1).encode())


STATS_ARRAYS = ("mean_rgb", "std_rgb", "mean_image", "cov", "eigval", "eigvec", "n_pixels")


def load_stats(shards) -> dict[str, np.ndarray]:
    """The arrays of SHARDS/stats.npz (local, or in a store); ShardError naming the file if it is missing,
    empty or not ours."""
    path = storage.join(shards, STATS)
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ShardError(f"{path}: missing (alexnet-prep writes it with the train split)") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ShardError(f"{path}: not a statistics file written by alexnet-prep ({e})") from None
    missing = [k for k in STATS_ARRAYS if k not in stats]
    if missing:
        raise ShardError(f"{path}: not a statistics file written by alexnet-prep (no {', '.join(missing)})")
    problem = stats_problem(stats)
    if problem:
        raise ShardError(f"{path}: {problem} (damaged; alexnet-prep over the same source with --rebuild writes "
                         "it again)")
    return stats


def stats_problem(stats: dict[str, np.ndarray]) -> str | None:
    """What makes the statistics unusable, or None: every array finite, means within 0-255, a positive
    variance per channel, positive eigenvalues in descending order, orthonormal eigenvectors that diagonalise
    the covariance."""
    for k in STATS_ARRAYS:
        if not np.all(np.isfinite(np.asarray(stats[k], np.float64))):
            return f"{k} is not finite"
    shapes = {"mean_rgb": (3,), "std_rgb": (3,), "cov": (3, 3), "eigval": (3,), "eigvec": (3, 3)}
    wrong = [k for k, shape in shapes.items() if np.shape(stats[k]) != shape]
    if wrong or np.ndim(stats["mean_image"]) != 3:
        return f"{', '.join(wrong) or 'mean_image'} has the wrong shape"
    for k in ("mean_rgb", "mean_image"):
        if np.min(stats[k]) < 0 or np.max(stats[k]) > 255:
            return f"{k} is outside 0-255"
    eigval, eigvec, cov = (np.asarray(stats[k], np.float64) for k in ("eigval", "eigvec", "cov"))
    if np.min(stats["std_rgb"]) <= 0 or np.min(eigval) <= 0 or np.any(np.diff(eigval) > 0):
        return "the variances or eigenvalues are not positive and descending"
    if not np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-6):
        return "the eigenvectors are not orthonormal"
    if not np.allclose(eigvec @ np.diag(eigval) @ eigvec.T, cov, rtol=1e-6, atol=1e-6 * np.max(eigval)):
        return "the eigenpairs do not match the covariance"
    return None


def shard_paths(shards, split: str, manifest: Manifest | None = None) -> list:
    """The tar shards of `split`, in manifest order (paths, or URLs for a dataset in a store)."""
    manifest = manifest or load_manifest(shards)
    if split not in manifest.splits:
        raise ShardError(f"{storage.join(shards, MANIFEST)}: no split {split!r} (has {sorted(manifest.splits)})")
    return [storage.join(shards, split, s.name) for s in manifest.splits[split].shards]


def first_shards(entries: list[ShardInfo], samples: int | None) -> int:
    """How many of the first shards hold `samples` samples (all of them for None)."""
    if samples is None:
        return len(entries)
    ends = np.cumsum([e.samples for e in entries])
    return min(len(entries), int(np.searchsorted(ends, samples)) + 1)


def undecodable(path: Path, most: int = 3) -> str:
    """The damage a decoder meets in a shard, for a message: ", sample KEY does not decode" (up to `most`
    keys), or "" if every JPEG decodes (corrupt data inside a JPEG often decodes, to wrong pixels)."""
    try:
        bad = [s.key for s in iter_samples(Path(path).read_bytes()) if _decoded(s.jpeg) is None]
    except (OSError, tarfile.TarError, ValueError):
        return ", its tar structure unreadable"
    if not bad:
        return ""
    if len(bad) == 1:
        return f", sample {bad[0]} does not decode"
    more = f" and {len(bad) - most} more" if len(bad) > most else ""
    return f", samples {', '.join(bad[:most])}{more} do not decode"


def iter_tar(data: bytes | bytearray):
    """(name, bytes) of each regular member of an in-memory tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                yield m.name, f.read()


def iter_samples(data: bytes | bytearray):
    """The Samples of an in-memory shard, in order: consecutive members that share a key make one."""
    key, members = None, {}
    for name, payload in iter_tar(data):
        stem, _, ext = name.partition(".")
        if stem != key and key is not None:
            yield Sample.from_members(key, members)
            members = {}
        key, members[ext] = stem, payload
    if key is not None:
        yield Sample.from_members(key, members)


def verify(shards: Path | str, check_images: bool = True, pool=None, progress=None) -> list[str]:
    """Re-read a shards directory and return its problems (empty if none), first problem first.

    Checks the manifest's shards exist with the recorded size and sha256, that each index equals the one
    the shard's bytes imply, sample counts, labels in range and consistent, that every image decodes to a
    256x256 RGB baseline JPEG, and that the statistics are finite and consistent (stats_problem). The shards
    are read by `pool` (workers.pool: its processes, the same verdicts in the same order; None: this process);
    `progress.update()` per shard.
    """
    shards = storage.location(shards)
    try:
        manifest = load_manifest(shards)
    except ShardError as e:
        return [str(e)]
    problems = []
    if "train" in manifest.splits:
        try:
            load_stats(shards)
        except ShardError as e:
            problems.append(str(e))
    timm = storage.join(shards, TIMM_INFO)
    try:
        timm_matches = json.loads(storage.read_bytes(timm)) == timm_info(manifest)
    except (OSError, ValueError, UserError):
        timm_matches = False
    if not timm_matches:
        problems.append(f"{timm}: missing or does not match {MANIFEST}")
    # each task names its shard and what to check it against (not the whole manifest: a task is pickled)
    tasks = [(storage.join(shards, split, info.name), info, manifest.image_size, len(manifest.classes),
              check_images) for split, entry in manifest.splits.items() for info in entry.shards]
    results = []
    for result in pool.imap(_shard_task, tasks, 2 * pool.size) if pool else map(_shard_task, tasks):
        results.append(result)
        if progress is not None:
            progress.update(1)
    at = 0
    for split, entry in manifest.splits.items():
        total = 0
        for found, count in results[at:at + len(entry.shards)]:
            problems += found
            total += count
        at += len(entry.shards)
        if total != entry.samples:
            problems.append(f"{storage.join(shards, split)}: {total} samples, {MANIFEST} says {entry.samples}")
    return problems


def _shard_task(args) -> tuple[list[str], int]:
    return _shard_problems(*args)


def _shard_problems(path, info: ShardInfo, size: int, n_classes: int,
                    check_images: bool) -> tuple[list[str], int]:
    """(problems, samples read) of one shard and its index (images of `size`, labels below `n_classes`)."""
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, storage.StoreError):
        return [f"{path}: missing"], 0
    problems = []
    if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        problems.append(f"{path}: size or sha256 differs from {MANIFEST} (damaged or replaced)")
    try:
        samples = list(iter_samples(data))  # bytes flipped inside JPEGs leave the tar headers (and the count)
    except (tarfile.TarError, ValueError) as e:
        return [*problems, f"{path}: unreadable samples ({e})"], 0
    if problems:
        return problems, len(samples)
    idx = storage.with_suffix(path, ".idx")
    try:
        index = storage.read_bytes(idx).decode()
    except (FileNotFoundError, UnicodeDecodeError, storage.StoreError):
        index = None
    if index != index_of(data):
        problems.append(f"{idx}: missing or does not match its shard")
    if len(samples) != info.samples:
        problems.append(f"{path}: {len(samples)} samples, {MANIFEST} says {info.samples}")
    for s in samples:
        if not 0 <= s.label < n_classes:
            problems.append(f"{path}: {s.key}: label {s.label} out of range")
        if check_images and not _baseline_jpeg(s.jpeg, size):
            problems.append(f"{path}: {s.key}.jpg: not a {size}x{size} baseline RGB JPEG")
    return problems, len(samples)


def _decoded(data: bytes):
    """The decoded PIL image, or None if PIL cannot decode the bytes."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, SyntaxError, ValueError):
        return None
    return im


def _baseline_jpeg(data: bytes, size: int) -> bool:
    im = _decoded(data)
    return (im is not None and im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)
            and not im.info.get("progressive") and not im.info.get("progression"))
