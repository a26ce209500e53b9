#!/usr/bin/env python3
"""Build a small ImageNet look-alike in every layout alexnet-prep must read (README, "alexnet-prep").

    python tools/make_sample_imagenet.py --out data/sample
    python tools/make_sample_imagenet.py --out /tmp/s1000 --classes 1000 --layouts extracted   # ~1 min, 16 cores

writes, from one set of synthetic photos (classes are learnable: each class is a combination of a stripe
angle, a colour and a stripe frequency, with random placement, scale, lighting and noise):

    extracted/  train/<wnid>/*.JPEG, val/<wnid>/*.JPEG           (after the popular valprep script)
    kaggle/     ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/*.JPEG}, LOC_val_solution.csv, LOC_synset_mapping.txt
    devkit/     train/<wnid>/, val/*.JPEG, ILSVRC2012_devkit_t12/data/{meta.mat, ..._ground_truth.txt}
    archives/   ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar, devkit .tar.gz
    hf/         data/train_images_{0..}.tar.gz, val_images.tar.gz, test_images.tar.gz, classes.py (Hugging
                Face's ILSVRC/imagenet-1k: flat members named <original stem>_<wnid>.JPEG; test carries no class)

The first 20 classes have real wnids; more classes get made-up ones (n9xxxxxxx, sorted after the real ones).
The devkit's ILSVRC2012_IDs are deliberately not the sorted order of the wnids (as in the real devkit).
Planted quirks (in train unless noted): CMYK JPEG, PNG named .JPEG, grayscale, progressive JPEG (also val),
tiny (40x30), huge (3200x2400), extreme aspect ratio (12:1), truncated JPEG, empty file, stray non-image.
QUIRKS below lists them with whether prep should keep them. The output is the same bytes for any --workers.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
         "n01514668", "n01514859", "n01518878", "n01530575", "n01531178", "n01532829", "n01534433",
         "n01537544", "n01558993", "n01560419", "n01580077", "n01582220", "n01592084"]
# Typical ImageNet shapes: most photos are about 500x375 (source_shape draws the tails).
SHAPES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (500, 400), (400, 500), (640, 480),
          (500, 281), (450, 300)]
GREY = 0.03  # share of greyscale sources (ImageNet's train set: about 2%)
# (file stem suffix, kind, kept by prep?) planted in train class 0 (val gets the progressive one too).
QUIRKS = [("cmyk", "cmyk", True), ("png", "png", True), ("gray", "gray", True), ("progressive", "progressive", True),
          ("tiny", "tiny", True), ("huge", "huge", True), ("wide", "wide", True), ("truncated", "truncated", False),
          ("empty", "empty", False)]
STRAY = "Thumbs.db"  # a stray non-image in class 0's folder, not kept
LAYOUTS = ("extracted", "kaggle", "devkit", "archives", "hf")
HF_TRAIN_PARTS = 2  # Hugging Face ships five train archives; two are enough to show the layout


def wnids(n: int) -> list[str]:
    """The wnids of the first `n` classes, in sorted order: the real ones, then made-up ones."""
    return WNIDS[:n] + [f"n9{i:07d}" for i in range(max(0, n - len(WNIDS)))]


def _class_code(label: int, n_classes: int) -> tuple[float, float, float]:
    """Stripe angle and hue (fractions of a turn) and stripe cycles of a class. Up to 27 classes every class
    has its own angle and hue; beyond, neighbours would blur, so the label's digits in base ceil(cbrt(n))
    set the three features apart."""
    if n_classes <= 27:
        return label / n_classes, label / n_classes, 3 + 2 * (label % 4)
    k = math.ceil(n_classes ** (1 / 3) - 1e-9)
    return label % k / k, label // k % k / k, 3 + 4 * min(1.0, label // (k * k) / (k - 1))


def source_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a source photo, spread like ImageNet's train set: mostly the common sizes (median
    500x375), a quarter of other sizes and aspects, a few small ones (short side down to 56) and a few large
    (long side up to 2,400)."""
    u = rng.random()
    if u < 0.7:
        return SHAPES[rng.integers(len(SHAPES))]
    aspect = (4 / 3, 3 / 2, 1.0, 16 / 9, 5 / 4, 2.0)[rng.integers(6)]
    if u < 0.94:
        long = int(rng.integers(300, 1025))
    elif u < 0.98:
        long = int(rng.integers(56, 200) * aspect)
    else:
        long = int(rng.integers(1200, 2401))
    short = max(56, round(long / aspect))
    return (long, short) if rng.random() < 0.6 else (short, long)


TILE = 1024
_tiles: dict[str, np.ndarray] = {}


def _pink(seed: int, n: int = TILE) -> np.ndarray:
    """Periodic noise with a 1/f amplitude spectrum (the 1/f^2 power of natural images: texture at every
    scale), unit std, from a fixed seed."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n)
    r = np.hypot(f[:, None], f[None, : n // 2 + 1])
    r[0, 0] = 1.0
    spectrum = (rng.normal(size=r.shape) + 1j * rng.normal(size=r.shape)) / r
    spectrum[0, 0] = 0
    tile = np.fft.irfft2(spectrum, s=(n, n)).astype(np.float32)
    return tile / tile.std()


def _tile(name: str) -> np.ndarray:
    """The maker's fixed textures, made once per process: 1/f luminance, two 1/f colour-difference planes,
    and sensor grain (white noise, 3 channels)."""
    if not _tiles:
        _tiles["luma"] = _pink(101)[..., None]
        _tiles["chroma"] = np.stack([_pink(102), _pink(103)], -1)
        _tiles["grain"] = np.random.default_rng(104).normal(0, 1, (TILE, TILE, 3)).astype(np.float32)
    return _tiles[name]


def _window(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random h x w window of a texture tile (wrapping around: the 1/f tiles are periodic), maybe mirrored."""
    tile = _tile(name)
    y, x = int(rng.integers(0, TILE)), int(rng.integers(0, TILE))
    if y + h <= TILE and x + w <= TILE:
        out = tile[y:y + h, x:x + w]
    else:  # the rare large or wide image
        out = tile[((y + np.arange(h)) % TILE)[:, None], ((x + np.arange(w)) % TILE)[None, :]]
    return out[:, ::-1] if rng.random() < 0.5 else out


def _regions(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, int]:
    """A label map of a few random polygons (objects with hard edges over a background), and their count."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    k = int(rng.integers(3, 8))
    for i in range(1, k + 1):
        cx, cy, radius = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.5) * min(w, h)
        n = int(rng.integers(3, 8))
        angles, radii = np.sort(rng.uniform(0, 2 * np.pi, n)), radius * rng.uniform(0.5, 1.0, n)
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)], fill=i)
    return np.asarray(mask), k + 1


# Amplitudes (0-255 units) tuned so that alexnet-prep's 256x256 q95 JPEGs of these photos average ImageNet's
# 31.7 KiB and decode about as fast (tests/test_tools.py checks the bytes).
REGION, LUMA, CHROMA, GRAIN = 20.0, 17.0, 5.0, 2.0


def photo(rng: np.random.Generator, label: int, n_classes: int, shape) -> Image.Image:
    """A photo-like image of class `label`: the class's stripes, colours and a blob (what makes it learnable),
    drawn smooth at a quarter of the size and enlarged; over it, at full size, objects with hard edges, 1/f
    texture in brightness and colour, lighting and sensor grain."""
    w, h = shape
    sw, sh = max(4, w // 4), max(4, h // 4)
    a, b, cycles = _class_code(label, n_classes)
    angle = np.pi * a + rng.normal(0, 0.08)
    freq = cycles * rng.uniform(0.85, 1.15) / min(sw, sh) * 2 * np.pi
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 2 * np.pi))
    hue = np.array([np.cos(2 * np.pi * b + k * 2.1) for k in range(3)], np.float32)
    base = 128 + 70 * hue * rng.uniform(0.7, 1.1)
    img = base + 45 * stripes[..., None] * np.roll(hue, 1)
    # an off-centre blob of the class's second colour, at a random place and size
    cx, cy, r = rng.uniform(0.2, 0.8) * sw, rng.uniform(0.2, 0.8) * sh, rng.uniform(0.1, 0.3) * min(sw, sh)
    blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    img = img + 60 * blob[..., None] * np.roll(hue, 2)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    full = np.array(small.resize((w, h), Image.Resampling.BILINEAR), np.float32)
    regions, k = _regions(rng, w, h)
    offsets = rng.normal(0, REGION, (k, 3)).astype(np.float32)
    gains = (LUMA * rng.uniform(0.5, 1.5, k)).astype(np.float32)
    full += offsets[regions]  # in place, channel by channel: full-size temporaries are most of the time
    full += (gains[regions] * _window("luma", rng, h, w)[..., 0])[..., None]
    chroma = _window("chroma", rng, h, w)
    full[..., 0] += CHROMA * chroma[..., 0]
    full[..., 1] += CHROMA * chroma[..., 1]
    full[..., 2] -= CHROMA * chroma[..., 0]
    full *= rng.uniform(0.75, 1.25)  # lighting
    full += GRAIN * _window("grain", rng, h, w)
    return Image.fromarray(np.clip(full, 0, 255, out=full).astype(np.uint8))


def source_jpeg(rng: np.random.Generator, label: int, n_classes: int) -> bytes:
    """One source file as a photographer's camera or Flickr left it: a photo of a drawn shape, a few percent
    greyscale, at a JPEG quality between 75 and 95."""
    im = photo(rng, label, n_classes, source_shape(rng))
    if rng.random() < GREY:
        im = im.convert("L")
    return jpeg(im, quality=int(rng.integers(75, 96)))


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, kw.pop("format", "JPEG"), quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def quirk_bytes(kind: str, rng, n_classes) -> bytes:
    if kind == "cmyk":
        return jpeg(photo(rng, 0, n_classes, (500, 375)).convert("CMYK"))
    if kind == "png":  # ImageNet's n02105855_2933.JPEG is really a PNG
        return jpeg(photo(rng, 0, n_classes, (500, 375)), format="PNG")
    if kind == "gray":
        return jpeg(photo(rng, 0, n_classes, (375, 500)).convert("L"))
    if kind == "progressive":
        return jpeg(photo(rng, 0, n_classes, (500, 375)), progressive=True)
    if kind == "tiny":
        return jpeg(photo(rng, 0, n_classes, (40, 30)))
    if kind == "huge":
        return jpeg(photo(rng, 0, n_classes, (3200, 2400)))
    if kind == "wide":
        return jpeg(photo(rng, 0, n_classes, (1200, 100)))
    if kind == "truncated":
        data = jpeg(photo(rng, 0, n_classes, (500, 375)))
        return data[: len(data) * 3 // 5]
    if kind == "empty":
        return b""
    raise ValueError(kind)


def write_meta_mat(path: Path, classes: list[str], ids: dict[str, int]) -> None:
    """A devkit meta.mat: 'synsets' with the real field names; leaves have num_children == 0."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ids[w], w, f"class {w}", f"synthetic class {w}", 0, np.zeros((1, 0)), 0, 40) for w in classes]
    n = len(classes)  # two inner nodes, as the real file has 860 of them after the 1,000 leaves
    rows += [(n + 1, "n00001740", "entity", "root", 2, np.array([1, 2]), 19, 0),
             (n + 2, "n00021939", "artifact", "inner", 1, np.array([3]), 17, 0)]
    table = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        table[i, 0] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": table})


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1330000000, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header (no time stamp, no name), so equal input gives equal bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def _class_files(args) -> list[str]:
    """Write the train files of one class (plus the quirks in class 0) under `folder`; their names, sorted.
    Each class has its own RNG, so classes run in parallel with the same bytes."""
    seed, label, n_classes, n, folder = args
    rng = np.random.default_rng([seed, label])
    wnid = wnids(n_classes)[label]
    files = [(f"{wnid}_{i}.JPEG", source_jpeg(rng, label, n_classes)) for i in rng.choice(100000, n, replace=False)]
    if label == 0:
        files += [(f"{wnid}_9{k:03d}.JPEG", quirk_bytes(kind, rng, n_classes)) for k, (_, kind, _) in enumerate(QUIRKS)]
        files.append((STRAY, b"\x00\x01not an image\xff" * 8))
    folder = Path(folder) / wnid
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (folder / name).write_bytes(data)
    return sorted(name for name, _ in files)


def _val_file(args) -> str:
    """Write one val image into its class folder; its name."""
    seed, i, label, n_classes, folder = args
    rng = np.random.default_rng([seed, 1_000_000 + i])
    if i == 3:  # the planted progressive val image
        data = jpeg(photo(rng, label, n_classes, source_shape(rng)), progressive=True)
    elif i == 5:  # and a greyscale one
        data = jpeg(photo(rng, label, n_classes, source_shape(rng)).convert("L"))
    else:
        data = source_jpeg(rng, label, n_classes)
    name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
    (Path(folder) / wnids(n_classes)[label]).mkdir(parents=True, exist_ok=True)
    (Path(folder) / wnids(n_classes)[label] / name).write_bytes(data)
    return name


def make(out: Path, classes: int = 10, train_per_class: int = 40, val_per_class: int = 10, seed: int = 0,
         layouts=LAYOUTS, workers: int = 1) -> dict:
    """Write the layouts under `out` (same bytes for any `workers`); returns {"train"|"val": {name: label}}."""
    from multiprocessing import get_context

    names = wnids(classes)
    if out.exists():
        shutil.rmtree(out)
    ext = out / "extracted"
    val_labels = np.random.default_rng([seed, 999]).permutation(np.repeat(np.arange(classes), val_per_class))
    with get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool:
        per_class = pool.map(_class_files, [(seed, c, classes, train_per_class, ext / "train") for c in range(classes)],
                             chunksize=max(1, classes // (4 * workers)))
        val_names = pool.map(_val_file, [(seed, i, int(c), classes, ext / "val") for i, c in enumerate(val_labels)],
                             chunksize=max(1, len(val_labels) // (4 * workers)))
    train_files = dict(zip(names, per_class, strict=True))
    truth = {"train": {n: c for c, w in enumerate(names) for n in train_files[w]},
             "val": {n: int(c) for n, c in zip(val_names, val_labels, strict=True)}}
    val_files = [(n, (ext / "val" / names[truth["val"][n]] / n).read_bytes()) for n in val_names]
    if "kaggle" in layouts:
        _kaggle(out, ext, names, val_files, truth)
    if "devkit" in layouts or "archives" in layouts:
        _devkit(out, names, val_files, truth)
    if "archives" in layouts:
        arc = out / "archives"
        arc.mkdir()
        class_tars = [(f"{w}.tar", tar_bytes([(n, (ext / "train" / w / n).read_bytes()) for n in train_files[w]]))
                      for w in names]
        (arc / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(class_tars))
        (arc / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(val_files))
        with tarfile.open(arc / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
            tf.add(out / "devkit" / "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12")
    if "hf" in layouts:
        _hugging_face(out, ext, names, train_files, val_files, truth, seed)
    return truth


class _Serial:
    """A stand-in for a pool with one worker."""

    @staticmethod
    def map(f, xs, chunksize=1):
        return list(map(f, xs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _kaggle(out, ext, names, val_files, truth):
    """Kaggle: nested folders, flat val, a CSV of 'wnid x y x y ...' boxes (wnid first)."""
    kag = out / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    (kag / "val").mkdir(parents=True)
    os.symlink((ext / "train").resolve(), kag / "train")
    for name, _ in val_files:
        os.symlink((ext / "val" / names[truth["val"][name]] / name).resolve(), kag / "val" / name)
    with open(out / "kaggle" / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for name, _ in reversed(val_files):  # row order is not file order in the real CSV either
            wn = names[truth["val"][name]]
            w.writerow([name.split(".")[0], f"{wn} 10 20 200 220 {wn} 5 5 50 60"])
    (out / "kaggle" / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in names))


def _devkit(out, names, val_files, truth):
    """Devkit: flat val; ground truth as ILSVRC2012_IDs that are NOT sorted-wnid order (the trap)."""
    dev = out / "devkit"
    (dev / "val").mkdir(parents=True)
    os.symlink((out / "extracted" / "train").resolve(), dev / "train")
    for name, data in val_files:
        (dev / "val" / name).write_bytes(data)
    ids = {w: i + 1 for i, w in enumerate(reversed(names))}
    kit = dev / "ILSVRC2012_devkit_t12" / "data"
    write_meta_mat(kit / "meta.mat", names, ids)
    (kit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[names[truth['val'][n]]]}\n" for n, _ in val_files))


def _hugging_face(out, ext, names, train_files, val_files, truth, seed):
    """Hugging Face's ILSVRC/imagenet-1k: gzipped tars of flat files named <stem>_<wnid>.JPEG, train spread
    over several archives in no class order, and test images that carry no class."""
    data = out / "hf" / "data"
    data.mkdir(parents=True)
    train = [(w, n) for w in names for n in train_files[w]]
    order = np.random.default_rng([seed, 7]).permutation(len(train))
    parts = [[] for _ in range(HF_TRAIN_PARTS)]
    for k, i in enumerate(order):
        w, n = train[i]
        stem, dot, suffix = n.partition(".")
        hf_name = f"{stem}_{w}.{suffix}" if dot else n  # the stray file keeps its name: it has no class
        parts[k % HF_TRAIN_PARTS].append((hf_name, (ext / "train" / w / n).read_bytes()))
    for k, members in enumerate(parts):
        (data / f"train_images_{k}.tar.gz").write_bytes(gzip_bytes(tar_bytes(members)))
    val = [(f"{n.split('.')[0]}_{names[truth['val'][n]]}.JPEG", d) for n, d in val_files]
    (data / "val_images.tar.gz").write_bytes(gzip_bytes(tar_bytes(val)))
    rng = np.random.default_rng([seed, 8])
    test = [(f"ILSVRC2012_test_{i + 1:08d}.JPEG", jpeg(photo(rng, i % len(names), len(names), (500, 375))))
            for i in range(3)]
    (data / "test_images.tar.gz").write_bytes(gzip_bytes(tar_bytes(test)))
    # the dataset repository's class table, as its classes.py holds it
    rows = "".join(f'        "{w}": "class {w}",\n' for w in names)
    (out / "hf" / "classes.py").write_text(f"from collections import OrderedDict\n\nIMAGENET2012_CLASSES = "
                                           f"OrderedDict(\n    {{\n{rows}    }}\n)\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/sample"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: cores)")
    a = p.parse_args(argv)
    layouts = tuple(x for x in a.layouts.split(",") if x)
    if not set(layouts) <= set(LAYOUTS) or "extracted" not in layouts:
        p.error(f"--layouts must include extracted and be among {','.join(LAYOUTS)}")
    if not 2 <= a.classes <= 10_000_000:
        p.error("--classes must be at least 2")
    truth = make(a.out, a.classes, a.train_per_class, a.val_per_class, a.seed, layouts, max(1, a.workers))
    n_train, n_val = len(truth["train"]), len(truth["val"])
    print(f"wrote {n_train} train and {n_val} val files of {a.classes} classes in {len(layouts)} layouts under {a.out}")


if __name__ == "__main__":
    main()
