"""Finding ImageNet images and labels in every layout users have (docs/design.md, "ImageNet as users have it").

The result of `find` is a `Source`: the sorted class list, the class names found beside the images, the
listing of every file read (listing.py: folders are listed one stat per file, in parallel when prep passes its
pool's `map`) and, per split, a list of units of work (units.py: one class per kind of source, each a
picklable recipe for 64 images, or one class archive, that a worker reads), made when first asked for: a
re-run that finds nothing to do needs the listing only. Nothing is extracted; what is read out of archives to
list them (Hugging Face member names, the official tars' offsets) is cached beside the output, keyed on the
archive's size and time.

Labels are indices into the sorted wnid list. The devkit's ground truth holds ILSVRC2012_IDs, which are *not*
sorted indices; they are mapped through meta.mat's WNID column.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..config import UserError
from .listing import ArchiveCache, Folder, Listing, scan, some_files
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
    """What `find` found: classes (sorted wnids), the listing of every file it reads, a description of the
    layout, the class names found beside the images, files passed over while finding (reported like skipped
    images), notes, and the units per split (made on first use)."""

    root: Path
    classes: list[str]
    layout: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was found and deliberately not read
    class_names: dict[str, str] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    listing: Listing = field(default_factory=Listing)
    makers: dict[str, Callable[[], list[Unit]]] = field(default_factory=dict)
    _units: dict[str, list[Unit]] | None = None
    _devkit: tuple | None = None  # (meta.mat bytes, ground truth bytes, where), read once: see _devkit_files

    @property
    def units(self) -> dict[str, list[Unit]]:
        """The units of work of each split."""
        if self._units is None:
            self._units = {split: make() for split, make in self.makers.items()}
        return self._units

    def read(self, path: Path) -> None:
        """List a file the source reads besides its images (an archive, labels, class names)."""
        rel = os.path.relpath(path.parent, self.root)
        self.listing.add(some_files(str(self.root), "" if rel == "." else rel, [path.name]))

    def scan(self, folders: list[Path], map_=map) -> list[Folder]:
        """List `folders` (below the root), with `map_` (a pool's map lists them in parallel)."""
        rels = [os.path.relpath(d, self.root) for d in folders]
        found = list(map_(functools.partial(scan, str(self.root)), rels))
        for f in found:
            self.listing.add(f)
        return found


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


def _find_hf(root: Path, hf: Path, splits, limit, cache: ArchiveCache) -> Source:
    """The Hugging Face layout under `hf`."""
    train = sorted(hf.glob(HF_TRAIN))
    wanted = (train if "train" in splits or not (hf / HF_VAL).is_file() else []) + \
        ([hf / HF_VAL] if "val" in splits and (hf / HF_VAL).is_file() else [])
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:  # one decompression per uncached archive, in parallel
        names = dict(zip(wanted, pool.map(lambda a: cache.get(a, _gz_members), wanted), strict=True))
    label_source = [a for a in wanted if a in train] or wanted
    classes = sorted({w for a in label_source for w in (hf_key(n)[1] for n in names[a]) if w})
    _check_wnids(classes, hf)
    index = {w: i for i, w in enumerate(classes)}
    source = Source(root, classes)
    source.class_names = _hf_names(source, hf)
    for archive in wanted:
        source.read(archive)
    if "train" in splits:
        if not train:
            raise LayoutError(f"{hf}: no training archives ({HF_TRAIN})")
        source.makers["train"] = lambda: _hf_units("train", {a: names[a] for a in train}, index, limit)
        source.layout["train"] = f"Hugging Face archives ({', '.join(a.name for a in train)})"
    if "val" in splits:
        if hf / HF_VAL not in names:
            raise LayoutError(f"{hf}: no validation archive ({HF_VAL})")
        source.makers["val"] = lambda: _hf_units("val", {hf / HF_VAL: names[hf / HF_VAL]}, index, limit)
        source.layout["val"] = f"Hugging Face archive ({HF_VAL})"
    if (hf / HF_TEST).is_file():
        source.notes.append(f"{hf / HF_TEST}: test images carry no class; not read")
    return source


def _hf_names(source: Source, hf: Path) -> dict[str, str]:
    from ..classnames import parse_hf_classes

    for d in (source.root, hf, hf.parent):
        if (d / HF_CLASSES).is_file():
            source.read(d / HF_CLASSES)
            return parse_hf_classes((d / HF_CLASSES).read_text(errors="replace"))
    return {}


def find(root, splits=("train", "val"), layout: str = "auto", limit_per_class: int | None = None, *,
         map_=map, cache: ArchiveCache | None = None) -> Source:
    """Find classes and images for `splits` under `root`; `layout` is 'auto' (folders, then the official
    archives, then Hugging Face's), 'folders', 'archives' or 'hf'. `map_` lists class folders (a pool's map
    lists them in parallel); `cache` keeps what was read out of archives to list them."""
    root, cache = Path(root), cache or ArchiveCache(None)
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    data = root / KAGGLE_DATA if (root / KAGGLE_DATA).is_dir() else root  # Kaggle nests the folders
    use_folders, use_archives = layout in ("auto", "folders"), layout in ("auto", "archives")
    hf = _hf_dir(root) if layout in ("auto", "hf") else None
    if hf is not None and not (use_folders and _wnid_dirs(data / "train")) and \
            not (use_archives and (root / TRAIN_TAR).is_file()):
        return _find_hf(root, hf, splits, limit_per_class, cache)
    source = Source(root, [])
    source.class_names = _found_names(source, data)
    train_units = _find_train(source, data, use_folders, use_archives, limit_per_class, map_, cache)
    index = {w: i for i, w in enumerate(source.classes)}
    for split in splits:
        if split == "train":
            if train_units is None:
                raise LayoutError(f"{root}: no training images (train/<wnid>/ folders or {TRAIN_TAR})")
            source.makers["train"] = train_units(index)
        elif split == "val":
            source.makers["val"], source.layout["val"] = _val_units(source, data, index, use_folders, use_archives,
                                                                    limit_per_class, map_, cache)
        else:
            raise LayoutError(f"unknown split {split!r} (expected train or val)")
    return source


def _find_train(source: Source, data: Path, use_folders: bool, use_archives: bool, limit, map_, cache):
    """Set source.classes (and the train layout) from the first layout present; returns a function of the
    class index that makes the train units' maker, or None when there are no training images."""
    root, train_dir, train_tar = source.root, data / "train", source.root / TRAIN_TAR
    if use_folders and _wnid_dirs(train_dir):
        source.classes = _wnid_dirs(train_dir, "train", source.skipped)
        source.layout["train"] = f"folders ({train_dir})"
        folders = source.scan([train_dir / w for w in source.classes], map_)
        return lambda index: lambda: _folder_units("train", source.root, folders, limit)
    if use_archives and train_tar.is_file():
        inner = cache.get(train_tar, _tar_index)
        source.read(train_tar)
        source.classes = sorted(n.split(".")[0] for n in inner if n.endswith(".tar"))
        _check_wnids(source.classes, train_tar)
        listed = _devkit_classes(source, data)
        if listed and set(listed) - set(source.classes):
            raise LayoutError(f"{train_tar}: holds {len(source.classes)} class archives but the devkit lists "
                              f"{len(listed)} classes (missing {sorted(set(listed) - set(source.classes))[:3]}...); "
                              "an incomplete download?")
        source.layout["train"] = f"archive ({train_tar})"
        return lambda index: lambda: [
            ClassTarUnit("train", f"train/{w}", archive=str(train_tar), offset=inner[w + ".tar"][0],
                         size=inner[w + ".tar"][1], label=index[w], limit=limit) for w in source.classes]
    source.classes = (_wnid_dirs(data / "val") if use_folders else []) or _devkit_classes(source, data)
    if not source.classes:
        raise LayoutError(
            f"{root}: no ImageNet classes found. Expected train/<wnid>/ folders, {TRAIN_TAR}, Hugging Face's "
            f"data/{HF_TRAIN}, val/<wnid>/ folders or a devkit ({DEVKIT}/ or {DEVKIT}.tar.gz)")
    return None


def _found_names(source: Source, data: Path) -> dict[str, str]:
    """Class names beside the images: Kaggle's LOC_synset_mapping.txt, else the devkit's meta.mat words."""
    from ..classnames import parse_mapping

    for d in (source.root, data):
        if (d / KAGGLE_MAPPING).is_file():
            source.read(d / KAGGLE_MAPPING)
            return parse_mapping((d / KAGGLE_MAPPING).read_text(errors="replace"))
    devkit = _devkit_files(source, data)
    return _meta_words(devkit[0], devkit[2]) if devkit else {}


def _wnid_dirs(d: Path, split: str | None = None, skipped: list | None = None) -> list[str]:
    """The class folders of `d`, sorted. Regular files beside them are listed in `skipped` (they are
    reported, not silently passed over); other folders are an error."""
    if not d.is_dir():
        return []
    with os.scandir(d) as it:
        entries = sorted((e.name, e.is_dir()) for e in it)
    subdirs = [name for name, is_dir in entries if is_dir]
    wnids = [s for s in subdirs if WNID.match(s)]
    if wnids and len(wnids) != len(subdirs):
        others = [s for s in subdirs if not WNID.match(s)]
        raise LayoutError(f"{d}: folders that are not wnids (like n01440764): {', '.join(others[:5])}")
    if skipped is not None:
        skipped += [{"split": split, "source": str(d / name), "reason": f"a file where a class folder belongs "
                     f"({d.name}/ holds one folder per wnid); not read"} for name, is_dir in entries if not is_dir]
    return wnids


def _check_wnids(names, where):
    bad = [n for n in names if not WNID.match(n)]
    if bad:
        raise LayoutError(f"{where}: names that are not wnids (like n01440764): {', '.join(bad[:5])}")


def _tar_index(path: Path) -> dict[str, list[int]]:
    """member name -> (data offset, size) for the regular files of a tar, reading headers only. A tar that
    ends without tar's end-of-archive marker (two zero blocks) was cut short, even when the cut fell between
    two members, where tarfile would stop without a word."""
    try:
        with tarfile.open(path, "r:") as tf:
            members = {m.name: [m.offset_data, m.size] for m in tf if m.isfile()}
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


def _chunks(entries):
    n = FILES_PER_UNIT
    return [tuple(entries[i:i + n]) for i in range(0, len(entries), n)]


def _paths(root: Path, folder: Folder) -> list[str]:
    """The files of a listed folder, in name order (links that lead nowhere included: prep reports them as
    unreadable rather than passing over them in silence)."""
    top = os.path.join(root, folder.rel)
    return [os.path.join(top, name) for name in folder.names()]


def _folder_units(split, root: Path, folders: list[Folder], limit) -> list[Unit]:
    """Units of FILES_PER_UNIT files in class order (`folders` are the classes' folders in label order), a unit
    running on into the next class: classes of a few images do not make units of a few images, each paying a
    unit's fixed costs (its work file, its task)."""
    entries = [FileEntry(p, label) for label, f in enumerate(folders) for p in _limited(_paths(root, f), limit)]
    return [FolderUnit(split, f"{split}/{i:05d}", len(chunk), files=chunk) for i, chunk in enumerate(_chunks(entries))]


def _val_units(source: Source, data, index, use_folders, use_archives, limit, map_, cache):
    """(maker of the val units, a description of the layout)."""
    root = source.root
    val_dir, val_tar = data / "val", root / VAL_TAR
    if use_folders and _wnid_dirs(val_dir):
        found = _wnid_dirs(val_dir, "val", source.skipped)
        unknown = [w for w in found if w not in index]
        if unknown:
            raise LayoutError(f"{val_dir}: class folders not among the training classes: {unknown[:5]}")
        folders = {f.rel: f for f in source.scan([val_dir / w for w in found], map_)}
        rels = [os.path.relpath(val_dir / w, root) for w in index]  # every class in label order, empty or not
        ordered = [folders.get(rel) or Folder(rel, 0, b"") for rel in rels]
        return (lambda: _folder_units("val", root, ordered, limit)), f"class folders ({val_dir})"
    if use_folders and val_dir.is_dir() and any(e.is_file() for e in os.scandir(val_dir)):
        labels, how = _val_labels(source, data, index)
        folder = source.scan([val_dir])[0]

        def flat() -> list[Unit]:
            entries = _limit_by_label([FileEntry(p, labels.get(sample_key(p), -1)) for p in _paths(root, folder)],
                                      limit)
            return [FolderUnit("val", f"val/{i:05d}", len(c), files=c) for i, c in enumerate(_chunks(entries))]
        return flat, f"flat folder ({val_dir}), labels from {how}"
    if use_archives and val_tar.is_file():
        labels, how = _val_labels(source, data, index)
        members = sorted(cache.get(val_tar, _tar_index).items())
        source.read(val_tar)

        def tar() -> list[Unit]:
            entries = _limit_by_label([TarMember(off, size, name, labels.get(sample_key(name), -1))
                                       for name, (off, size) in members], limit)
            return [TarUnit("val", f"val/{i:05d}", len(c), archive=str(val_tar), members=c)
                    for i, c in enumerate(_chunks(entries))]
        return tar, f"archive ({val_tar}), labels from {how}"
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


def _val_labels(source: Source, data: Path, index) -> tuple[dict[str, int], str]:
    """Validation labels for flat val images: Kaggle's CSV first, else the devkit."""
    root = source.root
    for d in (root, data):
        path = d / KAGGLE_CSV
        if path.is_file():
            source.read(path)
            labels = {}
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    wnid = (row.get("PredictionString") or "").split(" ")[0]
                    labels[row["ImageId"]] = index.get(wnid, -1)
            if not labels:
                raise LayoutError(f"{path}: no rows (expected ImageId,PredictionString)")
            return labels, str(path)
    devkit = _devkit_files(source, data)
    if devkit is None:
        raise LayoutError(f"{root}: flat validation images but no labels: put {KAGGLE_CSV} or the devkit "
                          f"({DEVKIT}/ or {DEVKIT}.tar.gz) next to them")
    meta, truth, where = devkit
    id_to_wnid = _meta_ids(meta, where)
    labels = {}
    for i, line in enumerate(truth.decode().split()):
        labels[f"ILSVRC2012_val_{i + 1:08d}"] = index.get(id_to_wnid.get(int(line), ""), -1)
    return labels, f"{where} (ILSVRC2012_IDs mapped to sorted wnids)"


def _devkit_files(source: Source, data: Path):
    """(meta.mat bytes, ground-truth bytes, where) from an extracted devkit or its .tar.gz, or None; read once
    per Source (class names, classes and val labels all ask for it)."""
    if source._devkit is None:
        source._devkit = (_read_devkit(source, data),)
    return source._devkit[0]


def _read_devkit(source: Source, data: Path):
    for d in (source.root, data):
        folder = d / DEVKIT
        if (folder / "data" / "meta.mat").is_file() and (folder / GROUND_TRUTH).is_file():
            source.read(folder / "data" / "meta.mat")
            source.read(folder / GROUND_TRUTH)
            return (folder / "data" / "meta.mat").read_bytes(), (folder / GROUND_TRUTH).read_bytes(), str(folder)
        archive = d / f"{DEVKIT}.tar.gz"
        if archive.is_file():
            source.read(archive)
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


def _devkit_classes(source: Source, data) -> list[str]:
    devkit = _devkit_files(source, data)
    return sorted(_meta_ids(devkit[0], devkit[2]).values()) if devkit else []
