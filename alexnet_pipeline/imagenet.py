"""Finding ImageNet images and labels in every layout users have (docs/design.md, "ImageNet as users have it").

The result of `find` is a `Source`: the sorted class list, the class names found beside the images and, per
split, a list of units of work (units.py: one class per kind of source, each a picklable recipe for a few
hundred images that a worker reads). Nothing is extracted.

Labels are indices into the sorted wnid list. The devkit's ground truth holds ILSVRC2012_IDs, which are *not*
sorted indices; they are mapped through meta.mat's WNID column.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import UserError
from .units import (
    ARCHIVE_ERRORS,
    ClassTarUnit,
    FileEntry,
    FolderUnit,
    GzMember,
    HfUnit,
    TarMember,
    TarUnit,
    Unit,
    hf_key,
    member_bytes,
    sample_key,
)

WNID = re.compile(r"^n\d{8}$")
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12"
KAGGLE_CSV, KAGGLE_DATA = "LOC_val_solution.csv", Path("ILSVRC/Data/CLS-LOC")
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
FILES_PER_UNIT = 64  # small enough to balance 2-16 workers, large enough that per-unit files stay few
# Hugging Face's ILSVRC/imagenet-1k: gzipped tars of flat files named <original stem>_<wnid>.JPEG
HF_TRAIN, HF_VAL, HF_TEST = "train_images_*.tar.gz", "val_images.tar.gz", "test_images.tar.gz"
HF_CLASSES = "classes.py"  # the dataset repository's wnid -> name table
KAGGLE_MAPPING = "LOC_synset_mapping.txt"


class LayoutError(UserError):
    """The tree is not ImageNet as we know it; the message says what was expected where."""


@dataclass
class Source:
    """What `find` found: classes (sorted wnids), units per split, a description of the layout, the class
    names found beside the images, files passed over while finding (reported like skipped images) and
    notes."""

    root: Path
    classes: list[str]
    units: dict[str, list[Unit]] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was found and deliberately not read
    class_names: dict[str, str] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)


def _hf_dir(root: Path) -> Path | None:
    for d in (root / "data", root):
        if any(d.glob(HF_TRAIN)) or (d / HF_VAL).is_file():
            return d
    return None


def _gz_members(path: Path) -> list[str]:
    """Names of the regular files of a .tar.gz in archive order (one pass of decompression); a truncated or
    damaged archive is named."""
    try:
        with tarfile.open(path, "r|gz") as tf:
            return [m.name for m in tf if m.isfile()]
    except ARCHIVE_ERRORS as e:
        raise LayoutError(f"{path}: unreadable or truncated ({e or type(e).__name__})") from None


def _hf_units(split: str, archives: dict[Path, list[str]], index: dict[str, int], limit) -> list[Unit]:
    """Units of FILES_PER_UNIT consecutive members of each archive; with `limit`, the first N keys of each class
    (in key order, as the folder layout's first N file names)."""
    keep = None
    if limit is not None:
        by_class: dict[int, list[str]] = {}
        for names in archives.values():
            for name in names:
                key, wnid = hf_key(name)
                by_class.setdefault(index.get(wnid, -1) if wnid else -1, []).append(key)
        keep = {k for label, keys in by_class.items() for k in (keys if label < 0 else sorted(keys)[:limit])}
    units: list[Unit] = []
    for archive, names in sorted(archives.items()):
        members = [GzMember(i, name, index.get(hf_key(name)[1] or "", -1)) for i, name in enumerate(names)
                   if keep is None or hf_key(name)[0] in keep]
        stem = archive.name.split(".")[0]
        units += [HfUnit(split, f"{split}/{stem}-{k:05d}", len(chunk), archive=str(archive), members=chunk)
                  for k, chunk in enumerate(_chunks(members))]
    return units


def _find_hf(root: Path, hf: Path, splits, limit) -> Source:
    """The Hugging Face layout under `hf`."""
    train = sorted(hf.glob(HF_TRAIN))
    wanted = (train if "train" in splits or not (hf / HF_VAL).is_file() else []) + \
        ([hf / HF_VAL] if "val" in splits and (hf / HF_VAL).is_file() else [])
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:  # one decompression per archive, in parallel
        names = dict(zip(wanted, pool.map(_gz_members, wanted), strict=True))
    label_source = [a for a in wanted if a in train] or wanted
    classes = sorted({w for a in label_source for w in (hf_key(n)[1] for n in names[a]) if w})
    _check_wnids(classes, hf)
    index = {w: i for i, w in enumerate(classes)}
    source = Source(root, classes, class_names=_hf_names(root, hf))
    if "train" in splits:
        if not train:
            raise LayoutError(f"{hf}: no training archives ({HF_TRAIN})")
        source.units["train"] = _hf_units("train", {a: names[a] for a in train}, index, limit)
        source.layout["train"] = f"Hugging Face archives ({', '.join(a.name for a in train)})"
    if "val" in splits:
        if hf / HF_VAL not in names:
            raise LayoutError(f"{hf}: no validation archive ({HF_VAL})")
        source.units["val"] = _hf_units("val", {hf / HF_VAL: names[hf / HF_VAL]}, index, limit)
        source.layout["val"] = f"Hugging Face archive ({HF_VAL})"
    if (hf / HF_TEST).is_file():
        source.notes.append(f"{hf / HF_TEST}: test images carry no class; not read")
    return source


def _hf_names(root: Path, hf: Path) -> dict[str, str]:
    from .classnames import parse_hf_classes

    for d in (root, hf, hf.parent):
        if (d / HF_CLASSES).is_file():
            return parse_hf_classes((d / HF_CLASSES).read_text(errors="replace"))
    return {}


def find(root, splits=("train", "val"), layout: str = "auto", limit_per_class: int | None = None) -> Source:
    """Find classes and images for `splits` under `root`; `layout` is 'auto' (folders, then the official
    archives, then Hugging Face's), 'folders', 'archives' or 'hf'."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    data = root / KAGGLE_DATA if (root / KAGGLE_DATA).is_dir() else root  # Kaggle nests the folders
    use_folders, use_archives = layout in ("auto", "folders"), layout in ("auto", "archives")
    hf = _hf_dir(root) if layout in ("auto", "hf") else None
    if hf is not None and not (use_folders and _wnid_dirs(data / "train")) and \
            not (use_archives and (root / TRAIN_TAR).is_file()):
        return _find_hf(root, hf, splits, limit_per_class)
    source = Source(root, [], class_names=_found_names(root, data))
    train_units = _find_train(source, data, use_folders, use_archives, limit_per_class)
    index = {w: i for i, w in enumerate(source.classes)}
    for split in splits:
        if split == "train":
            if train_units is None:
                raise LayoutError(f"{root}: no training images (train/<wnid>/ folders or {TRAIN_TAR})")
            source.units["train"] = train_units(index)
        elif split == "val":
            source.units["val"], source.layout["val"] = _val_units(root, data, index, use_folders, use_archives,
                                                                   limit_per_class, source)
        else:
            raise LayoutError(f"unknown split {split!r} (expected train or val)")
    return source


def _find_train(source: Source, data: Path, use_folders: bool, use_archives: bool, limit):
    """Set source.classes (and the train layout) from the first layout present; returns a function of the
    class index that makes the train units, or None when there are no training images."""
    root, train_dir, train_tar = source.root, data / "train", source.root / TRAIN_TAR
    if use_folders and _wnid_dirs(train_dir):
        source.classes = _wnid_dirs(train_dir, "train", source.skipped)
        source.layout["train"] = f"folders ({train_dir})"
        return lambda index: _folder_units("train", train_dir, source.classes, limit)
    if use_archives and train_tar.is_file():
        inner = _tar_index(train_tar)
        source.classes = sorted(n.split(".")[0] for n in inner if n.endswith(".tar"))
        _check_wnids(source.classes, train_tar)
        listed = _devkit_classes(root, data)
        if listed and set(listed) - set(source.classes):
            raise LayoutError(f"{train_tar}: holds {len(source.classes)} class archives but the devkit lists "
                              f"{len(listed)} classes (missing {sorted(set(listed) - set(source.classes))[:3]}...); "
                              "an incomplete download?")
        source.layout["train"] = f"archive ({train_tar})"
        return lambda index: [
            ClassTarUnit("train", f"train/{w}", archive=str(train_tar), offset=inner[w + ".tar"][0],
                         size=inner[w + ".tar"][1], label=index[w], limit=limit) for w in source.classes]
    source.classes = (_wnid_dirs(data / "val") if use_folders else []) or _devkit_classes(root, data)
    if not source.classes:
        raise LayoutError(
            f"{root}: no ImageNet classes found. Expected train/<wnid>/ folders, {TRAIN_TAR}, Hugging Face's "
            f"data/{HF_TRAIN}, val/<wnid>/ folders or a devkit ({DEVKIT}/ or {DEVKIT}.tar.gz)")
    return None


def _found_names(root: Path, data: Path) -> dict[str, str]:
    """Class names beside the images: Kaggle's LOC_synset_mapping.txt, else the devkit's meta.mat words."""
    from .classnames import parse_mapping

    for d in (root, data):
        if (d / KAGGLE_MAPPING).is_file():
            return parse_mapping((d / KAGGLE_MAPPING).read_text(errors="replace"))
    devkit = _devkit_files(root, data)
    return _meta_words(devkit[0], devkit[2]) if devkit else {}


def _wnid_dirs(d: Path, split: str | None = None, skipped: list | None = None) -> list[str]:
    """The class folders of `d`, sorted. Regular files beside them are listed in `skipped` (they are
    reported, not silently passed over); other folders are an error."""
    if not d.is_dir():
        return []
    entries = sorted(d.iterdir())
    subdirs = [p.name for p in entries if p.is_dir()]
    wnids = [s for s in subdirs if WNID.match(s)]
    if wnids and len(wnids) != len(subdirs):
        others = [s for s in subdirs if not WNID.match(s)]
        raise LayoutError(f"{d}: folders that are not wnids (like n01440764): {', '.join(others[:5])}")
    if skipped is not None:
        skipped += [{"split": split, "source": str(p), "reason": f"a file where a class folder belongs ({d.name}/ "
                     "holds one folder per wnid); not read"} for p in entries if not p.is_dir()]
    return wnids


def _check_wnids(names, where):
    bad = [n for n in names if not WNID.match(n)]
    if bad:
        raise LayoutError(f"{where}: names that are not wnids (like n01440764): {', '.join(bad[:5])}")


def _tar_index(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) for the regular files of a tar, reading headers only. A tar that
    ends without tar's end-of-archive marker (two zero blocks) was cut short, even when the cut fell between
    two members, where tarfile would stop without a word."""
    try:
        with tarfile.open(path, "r:") as tf:
            members = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
            end = tf.offset
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except ARCHIVE_ERRORS as e:
        raise LayoutError(f"{path}: not a readable tar archive ({e})") from None
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise LayoutError(f"{path}: truncated (no end-of-archive marker after {len(members)} files; an "
                          "interrupted download?)")
    return members


def _limited(paths, limit):
    return paths if limit is None else paths[:limit]


def _chunks(entries, n=FILES_PER_UNIT):
    return [tuple(entries[i:i + n]) for i in range(0, len(entries), n)]


def _listed_files(d: Path) -> list[Path]:
    """The files of a folder in sorted order, with symbolic links that lead nowhere (broken, looping): they
    are then reported as unreadable rather than passed over in silence."""
    return sorted(p for p in d.iterdir() if p.is_file() or (p.is_symlink() and not p.exists()))


def _folder_units(split, top: Path, classes, limit) -> list[Unit]:
    """Units of FILES_PER_UNIT files in class order, a unit running on into the next class: classes of a few
    images do not make units of a few images, each paying a unit's fixed costs (its work file, its task)."""
    entries = []
    for label, wnid in enumerate(classes):
        d = top / wnid
        files = _limited(_listed_files(d), limit) if d.is_dir() else []
        entries += [FileEntry(str(p), label) for p in files]
    return [FolderUnit(split, f"{split}/{i:05d}", len(chunk), files=chunk) for i, chunk in enumerate(_chunks(entries))]


def _val_units(root, data, index, use_folders, use_archives, limit, source: Source):
    val_dir, val_tar = data / "val", root / VAL_TAR
    if use_folders and _wnid_dirs(val_dir):
        found = _wnid_dirs(val_dir, "val", source.skipped)
        unknown = [w for w in found if w not in index]
        if unknown:
            raise LayoutError(f"{val_dir}: class folders not among the training classes: {unknown[:5]}")
        return _folder_units("val", val_dir, list(index), limit), f"class folders ({val_dir})"
    if use_folders and val_dir.is_dir() and any(p.is_file() for p in val_dir.iterdir()):
        labels, how = _val_labels(root, data, index)
        files = _listed_files(val_dir)
        entries = _limit_by_label([FileEntry(str(p), labels.get(sample_key(p), -1)) for p in files], limit)
        units = [FolderUnit("val", f"val/{i:05d}", len(c), files=c) for i, c in enumerate(_chunks(entries))]
        return units, f"flat folder ({val_dir}), labels from {how}"
    if use_archives and val_tar.is_file():
        labels, how = _val_labels(root, data, index)
        members = sorted(_tar_index(val_tar).items())
        entries = _limit_by_label([TarMember(off, size, name, labels.get(sample_key(name), -1))
                                   for name, (off, size) in members], limit)
        tar_units: list[Unit] = [TarUnit("val", f"val/{i:05d}", len(c), archive=str(val_tar), members=c)
                                 for i, c in enumerate(_chunks(entries))]
        return tar_units, f"archive ({val_tar}), labels from {how}"
    raise LayoutError(f"{root}: no validation images (val/<wnid>/ folders, flat val/*.JPEG or {VAL_TAR})")


def _limit_by_label(entries, limit):
    """The first `limit` entries of each label (entries are in sorted name order); unlabelled ones all."""
    if limit is None:
        return entries
    seen: dict[int, int] = {}
    kept = []
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
        if seen[e.label] <= limit or e.label < 0:
            kept.append(e)
    return kept


def _val_labels(root: Path, data: Path, index) -> tuple[dict[str, int], str]:
    """Validation labels for flat val images: Kaggle's CSV first, else the devkit."""
    for d in (root, data):
        path = d / KAGGLE_CSV
        if path.is_file():
            labels = {}
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    wnid = (row.get("PredictionString") or "").split(" ")[0]
                    labels[row["ImageId"]] = index.get(wnid, -1)
            if not labels:
                raise LayoutError(f"{path}: no rows (expected ImageId,PredictionString)")
            return labels, str(path)
    devkit = _devkit_files(root, data)
    if devkit is None:
        raise LayoutError(f"{root}: flat validation images but no labels: put {KAGGLE_CSV} or the devkit "
                          f"({DEVKIT}/ or {DEVKIT}.tar.gz) next to them")
    meta, truth, where = devkit
    id_to_wnid = _meta_ids(meta, where)
    labels = {}
    for i, line in enumerate(truth.decode().split()):
        labels[f"ILSVRC2012_val_{i + 1:08d}"] = index.get(id_to_wnid.get(int(line), ""), -1)
    return labels, f"{where} (ILSVRC2012_IDs mapped to sorted wnids)"


def _devkit_files(root: Path, data: Path):
    """(meta.mat bytes, ground-truth bytes, where) from an extracted devkit or its .tar.gz, or None."""
    for d in (root, data):
        folder = d / DEVKIT
        if (folder / "data" / "meta.mat").is_file() and (folder / GROUND_TRUTH).is_file():
            return (folder / "data" / "meta.mat").read_bytes(), (folder / GROUND_TRUTH).read_bytes(), str(folder)
        archive = d / f"{DEVKIT}.tar.gz"
        if archive.is_file():
            try:
                with tarfile.open(archive, "r:gz") as tf:
                    files = {m.name: m for m in tf if m.isfile()}
                    meta = files.get(f"{DEVKIT}/data/meta.mat")
                    truth = files.get(f"{DEVKIT}/{GROUND_TRUTH}")
                    if meta is None or truth is None:
                        raise LayoutError(f"{archive}: no data/meta.mat or ground truth inside")
                    return member_bytes(tf, meta), member_bytes(tf, truth), str(archive)
            except ARCHIVE_ERRORS as e:
                raise LayoutError(f"{archive}: unreadable ({e})") from None
    return None


def _meta_leaves(meta: bytes, where):
    """The 1,000 leaf synsets of meta.mat (a numpy record array)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        return synsets[synsets["num_children"] == 0]
    except (KeyError, ValueError, TypeError) as e:
        raise LayoutError(f"{where}: meta.mat has no usable 'synsets' table ({e})") from None


def _meta_ids(meta: bytes, where) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the 1,000 leaf synsets of meta.mat."""
    leaves = _meta_leaves(meta, where)
    return {int(i): str(w) for i, w in zip(leaves["ILSVRC2012_ID"], leaves["WNID"], strict=True)}


def _meta_words(meta: bytes, where) -> dict[str, str]:
    """wnid -> the synset's words, from meta.mat."""
    leaves = _meta_leaves(meta, where)
    if "words" not in leaves.dtype.names:
        return {}
    return {str(w): str(words) for w, words in zip(leaves["WNID"], leaves["words"], strict=True)}


def _devkit_classes(root, data) -> list[str]:
    devkit = _devkit_files(root, data)
    return sorted(_meta_ids(devkit[0], devkit[2]).values()) if devkit else []


def source_listing(source: Source) -> dict[str, tuple[int, int]]:
    """{name: (size, mtime_ns)} of every file a Source reads (archives as one file each), names relative to
    its root where they are below it. Prep keeps it with a finished output and compares it on a re-run: a
    resume or a finished output over a changed source would mix or keep old images."""
    listing = {}
    for split in sorted(source.units):
        for unit in source.units[split]:
            for path in unit.source_files():
                name = _relative(path, source.root)
                if name in listing:
                    continue
                try:
                    st = Path(path).stat()
                    listing[name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    listing[name] = (-1, -1)  # a broken link: listed, so that its repair counts as a change
    return listing


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
