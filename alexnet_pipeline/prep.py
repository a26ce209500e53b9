"""alexnet-prep: ImageNet (folders or archives) -> shuffled WebDataset shards + index + stats, in one pass.

Two stages, both resumable and both independent of the worker count:

1. Work: each `Unit` (a few hundred source images) is decoded, resized, cropped and re-encoded by one worker,
   which writes the JPEGs to ``.work/<split>/<unit>.bin`` and their keys, offsets, skipped files and exact
   statistics sums to ``<unit>.npz``. The .npz is renamed into place last, so it marks a finished unit;
   a killed run redoes at most the units that were in flight.
2. Shards: with every unit done, the samples are sorted by key, permuted with the seed (train only: DALI's
   reader shuffles only inside a buffer) and cut into shards, each written atomically with its index.
   A shard already on disk is finished (it was renamed into place complete), so it is kept.

Output bytes depend only on the inputs and the options that change them (`PrepConfig.fingerprint`).
"""

from __future__ import annotations

import collections
import errno
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, files, imagenet, shards, units
from .config import OptionError, UserError, check, option
from .image import BadImage, prepare
from .stats import Moments, summarize

WORK = ".work"
SPLITS = ("train", "val")


def _quality_problem(q: int) -> str | None:
    return None if 1 <= q <= 100 else "JPEG quality is 1..100"


@dataclass
class Source:
    imagenet_root: Path = option(dataclasses.MISSING, "ImageNet as folders, the official tars, Kaggle's or Hugging "
                                 "Face's layout (found by itself)")


@dataclass(kw_only=True)
class Workers:
    workers: int = option(0, "processes (0: every core this process may use)", minimum=0)


@dataclass
class PrepConfig(Source, Workers):
    """Options of alexnet-prep; `fingerprint` is the part that determines the output bytes."""

    out: Path = option(dataclasses.MISSING, "output directory for shards, dataset.json and stats.npz")
    splits: tuple[str, ...] = option(("train", "val"), "splits to prepare: train,val or one of them",
                                     choices=SPLITS)
    shard_size: int = option(1000, "samples per shard", minimum=1)
    quality: int = option(95, "JPEG quality (cuda-convnet2's 95)", validate=_quality_problem)
    image_size: int = option(256, "side of the prepared images (the paper's 256)", minimum=224, cli=False)
    seed: int = option(0, "seed of the global train shuffle", minimum=0)
    limit_per_class: int | None = option(None, "keep the first N files of each class", minimum=1)
    layout: str = option("auto", "which layout to read when several are present: auto (folders, then the "
                         "official archives, then Hugging Face's), folders, archives or hf",
                         choices=("auto", "folders", "archives", "hf"))
    progress: bool | None = option(None, "progress bars (default: when stderr is a terminal)")
    rebuild: bool = option(False, "if the source changed since OUT was written, rebuild OUT from it (without "
                           "this, a changed source is refused)")

    def __post_init__(self):
        self.imagenet_root, self.out, self.splits = Path(self.imagenet_root), Path(self.out), tuple(self.splits)
        check(self)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise OptionError(f"option splits: expected train, val or train,val; got {','.join(self.splits)!r}")

    def fingerprint(self) -> dict:
        return {"imagenet_root": str(Path(self.imagenet_root).resolve()), "splits": list(self.splits),
                "shard_size": self.shard_size, "quality": self.quality, "image_size": self.image_size,
                "seed": self.seed, "limit_per_class": self.limit_per_class, "layout": self.layout,
                "format_version": shards.FORMAT_VERSION}

    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


@dataclass
class PrepReport:
    """What a run did, for the summary line and for benchmarks."""

    samples: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    processed: int = 0  # images decoded in this run (0 when everything was already done)
    seconds: float = 0.0
    resumed: bool = False
    notes: list[str] = field(default_factory=list)  # said once in the summary (e.g. workers capped)


class PrepError(UserError):
    """A problem with the whole run (not one image): wrong tree, clashing output directory, nothing usable."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run; what is finished stays, and the same command resumes."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; run the same command again to resume")
        self.signum = signum


# ---- stage 1: units -> work files ---------------------------------------------------------------------

_counter = None  # images done, shared with the parent for a progress bar that moves within units


def _init_worker(counter):
    global _counter
    _counter = counter
    # Ctrl-C reaches the whole process group: the parent alone reports it. SIGTERM ends a worker quietly
    # (the parent's handler, inherited through fork, would raise in here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _work_paths(work: Path, unit: units.Unit) -> tuple[Path, Path]:
    base = work / unit.name  # unit names are "<split>/<part>"
    return base.with_suffix(".bin"), base.with_suffix(".npz")


def process_unit(unit: units.Unit, work: Path, size: int, quality: int) -> tuple[int, int]:
    """Prepare every image of `unit` into its work files; returns (usable, skipped)."""
    bin_path, npz_path = _work_paths(work, unit)
    keys, labels, offsets, sizes, skipped = [], [], [], [], []
    moments = Moments(size) if unit.split == "train" else None
    out = io.BytesIO()  # a unit is at most one class (~1,300 images, ~40 MB of JPEGs)
    try:
        for item in unit.items():
            try:
                if item.error:
                    raise BadImage(item.error)
                if item.label < 0:
                    raise BadImage("no label for this image")
                if not item.key:
                    raise BadImage("file name has no stem to use as a sample key")
                if len(item.key) > shards.MAX_KEY:
                    raise BadImage(f"file name too long for a shard member ({len(item.key)} characters as a key; "
                                   f"at most {shards.MAX_KEY})")
                jpeg, pixels = prepare(item.data, size, quality)
            except BadImage as e:
                skipped.append({"split": unit.split, "source": item.source, "reason": str(e)})
            else:
                offsets.append(out.tell()), sizes.append(len(jpeg))
                out.write(jpeg)
                keys.append(item.key), labels.append(item.label)
                if moments is not None:
                    moments.add(pixels)
            if _counter is not None:
                with _counter.get_lock():
                    _counter.value += 1
    except units.ARCHIVE_ERRORS as e:
        # a damaged archive loses the rest of this unit only; what was read so far is kept
        skipped.append({"split": unit.split, "source": unit.where,
                        "reason": f"archive unreadable after {len(keys) + len(skipped)} files: {e}"})
    files.atomic_write(bin_path, out.getvalue())
    arrays = {"keys": np.array(keys, dtype=str), "labels": np.array(labels, np.int64),
              "offsets": np.array(offsets, np.int64), "sizes": np.array(sizes, np.int64),
              "skipped": np.array(json.dumps(skipped))}
    if moments is not None:
        arrays.update(moments.to_arrays())
    shards.save_npz(npz_path, arrays)
    return len(keys), len(skipped)


def _run_units(cfg: PrepConfig, split: str, planned: list, work: Path, pool, workers: int) -> int:
    """Process the units of `split` not yet done; returns how many images were processed. At most two units
    per worker are in flight (a unit read from a .tar.gz carries its images' bytes)."""
    todo = [u for u in planned if not _work_paths(work, u)[1].exists()]
    if not todo:
        return 0
    (work / split).mkdir(parents=True, exist_ok=True)
    known = [u.expected for u in todo]
    counter = _counter
    counter.value = 0
    bar = _bar(cfg, None if None in known else sum(known), f"{split} images", "img")
    jobs = units.with_payloads(todo, queue_size=2 * workers)
    try:
        if pool is None:
            for unit in jobs:
                process_unit(unit, work, cfg.image_size, cfg.quality)
                bar.update(counter.value - bar.n)
        else:
            in_flight = collections.deque()
            for unit in jobs:
                in_flight.append(pool.apply_async(process_unit, (unit, work, cfg.image_size, cfg.quality)))
                while len(in_flight) >= 2 * workers:
                    _wait(in_flight.popleft(), bar, counter)
            while in_flight:
                _wait(in_flight.popleft(), bar, counter)
    finally:
        jobs.close()  # stops the archive readers at once if a unit failed or a signal came
        bar.close()
    return counter.value


def _wait(result, bar, counter) -> None:
    """Wait for one unit (re-raising its worker's exception), moving the bar while it is in flight."""
    while True:
        try:
            result.get(timeout=0.25)
            break
        except mp.TimeoutError:
            bar.update(counter.value - bar.n)
    bar.update(counter.value - bar.n)


# ---- stage 2: work files -> shards --------------------------------------------------------------------

def _collect(planned: list, work: Path):
    """Samples (key, label, bin file, offset, size) of all units, skipped files, and merged moments."""
    samples, skipped, moments, seen = [], [], None, {}
    for u in planned:
        bin_path, npz_path = _work_paths(work, u)
        with np.load(npz_path) as z:
            skipped += json.loads(str(z["skipped"]))
            for key, label, off, size in zip(z["keys"], z["labels"], z["offsets"], z["sizes"]):
                key = str(key)
                if key in seen:
                    skipped.append({"split": u.split, "source": f"{u.name}:{key}",
                                    "reason": f"duplicate sample key (kept the one from {seen[key]})"})
                    continue
                seen[key] = u.name
                samples.append((key, int(label), str(bin_path), int(off), int(size)))
            if "pixel_sum" in z.files:
                part = Moments.from_arrays(z)
                if moments is None:
                    moments = part
                else:
                    moments.merge(part)
    return samples, skipped, moments


def _write_shard_task(args) -> shards.ShardInfo:
    path, members = args
    if path.exists():  # renamed into place complete by an earlier run
        return shards.describe_shard(path)
    opened = {}

    def read(bin_path, offset, size):
        f = opened.get(bin_path) or opened.setdefault(bin_path, open(bin_path, "rb"))
        f.seek(offset)
        return f.read(size)

    try:
        return shards.write_shard(path, ((k, read(b, o, s), lab) for k, lab, b, o, s in members))
    finally:
        for f in opened.values():
            f.close()


def _write_shards(cfg: PrepConfig, split: str, samples, pool) -> list[shards.ShardInfo]:
    samples.sort(key=lambda s: s[0])
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    out = Path(cfg.out) / split
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(out / f"{split}-{i // cfg.shard_size:06d}.tar", samples[i:i + cfg.shard_size])
             for i in range(0, len(samples), cfg.shard_size)]
    bar = _bar(cfg, len(tasks), f"{split} shards", "shard")
    infos = []
    for info in (map if pool is None else pool.imap)(_write_shard_task, tasks):
        infos.append(info)
        bar.update(1)
    bar.close()
    return infos


# ---- the run --------------------------------------------------------------------------------------------

def _bar(cfg: PrepConfig, total, desc, unit):
    from tqdm import tqdm

    disable = (not sys.stderr.isatty()) if cfg.progress is None else not cfg.progress
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, smoothing=0.1, dynamic_ncols=True)


def _check_out(cfg: PrepConfig) -> bool:
    """True if `out` already holds this exact run, finished. Raises if it holds a different one."""
    out, ours = Path(cfg.out), cfg.fingerprint()
    if (out / WORK).is_dir() and not (out / WORK / "plan.json").exists():
        shutil.rmtree(out / WORK)  # killed before its plan was written: nothing was done yet
    for marker in (out / shards.MANIFEST, out / WORK / "plan.json"):
        if marker.exists():
            theirs = json.loads(marker.read_text())
            theirs = theirs.get("fingerprint", theirs)
            if theirs != ours:
                diff = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
                raise PrepError(f"{marker}: {out} holds a run with other options ({', '.join(diff)} differ); "
                                "use another --out or delete it")
            return marker.name == shards.MANIFEST
    if any(p.name != files.LOCK for p in out.iterdir()):
        raise PrepError(f"{out}: exists, is not empty and was not written by alexnet-prep")
    return False


# A full disk, a read-only or forbidden place: one line naming the file; the rerun resumes.
DISK_ERRNOS = files.DISK_ERRNOS | {errno.ENOTDIR, errno.ENAMETOOLONG}


def run(cfg: PrepConfig) -> PrepReport:
    """Run (or resume) a prep; returns the report. Raises UserError subclasses (PrepError, LayoutError) for
    the whole run and Interrupted on SIGTERM/SIGINT (Ctrl-C)."""
    def on_term(signum, frame):
        raise Interrupted(signum)

    old_handler = signal.signal(signal.SIGTERM, on_term)
    try:
        return _run(cfg)
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise PrepError(f"{e.filename or 'output'}: {e.strerror}; fix that and run the same command again to "
                            "resume (finished work is kept)") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)


def _changed(cfg: PrepConfig, old: dict | None, new: dict, what: str) -> bool:
    """Whether the source differs from `old` (the listing a run was started or finished with). Without
    --rebuild a difference is refused in one line that says what changed."""
    changes = shards.source_changes(old, new) if old is not None else "no record of its source"
    if not changes:
        return False
    if not cfg.rebuild:
        raise PrepError(f"{cfg.imagenet_root}: changed since {cfg.out} was {what} ({changes}); run again with "
                        f"--rebuild to rebuild {cfg.out} from it, or use another --out")
    return True


def _clear(out: Path) -> None:
    """Remove a previous run's outputs (for --rebuild), leaving the lock."""
    for p in out.iterdir():
        if p.name != files.LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _start(cfg: PrepConfig, listing: dict) -> bool:
    """Create OUT/.work with its plan and source listing, or check that a resumed run reads the same
    source; True if resumed."""
    out, work = Path(cfg.out), Path(cfg.out) / WORK
    if work.exists():
        if not _changed(cfg, shards.read_source(work), listing, "started"):
            files.remove_partials(out)  # files a killed run was writing; their units/shards are redone
            return True
        _clear(out)
    work.mkdir(parents=True)
    shards.write_source(work, listing)
    plan = {"fingerprint": cfg.fingerprint(), "source": shards.source_digest(listing)}
    files.atomic_write(work / "plan.json", json.dumps(plan, indent=1).encode())
    return False


def _run(cfg: PrepConfig) -> PrepReport:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with files.DirectoryLock(out, "alexnet-prep"):
            return _locked_run(cfg)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty directory behind
        raise


def _finished_report(cfg: PrepConfig, t0: float) -> PrepReport:
    out = Path(cfg.out)
    shutil.rmtree(out / WORK, ignore_errors=True)  # a run stopped right after its manifest left its work files
    manifest = shards.load_manifest(out)
    if not (out / shards.TIMM_INFO).exists():  # written after the manifest
        shards.write_timm_info(out, manifest)
    return PrepReport({s: e["samples"] for s, e in manifest["splits"].items()}, manifest["skipped"], 0,
                      time.perf_counter() - t0, resumed=True)


def _locked_run(cfg: PrepConfig) -> PrepReport:
    global _counter
    t0 = time.perf_counter()
    out, work = Path(cfg.out), Path(cfg.out) / WORK
    finished = _check_out(cfg)
    source = imagenet.find(cfg.imagenet_root, cfg.splits, cfg.layout, cfg.limit_per_class)
    listing = imagenet.source_listing(source)
    if finished:
        if not _changed(cfg, shards.read_source(out), listing, "written"):
            return _finished_report(cfg, t0)
        _clear(out)
    report = PrepReport(resumed=_start(cfg, listing), notes=list(source.notes))
    n_units = sum(len(u) for u in source.units.values())
    workers = min(cfg.n_workers(), n_units)
    if workers < cfg.n_workers():
        report.notes.append(f"{workers} workers, not {cfg.n_workers()}: there are {n_units} units of work")
    manifest = {"format_version": shards.FORMAT_VERSION, "image_size": cfg.image_size, "jpeg_quality": cfg.quality,
                "classes": source.classes, "class_names": {w: source.class_names[w] for w in source.classes
                                                           if w in source.class_names},
                "layout": source.layout, "splits": {}, "skipped": [], "fingerprint": cfg.fingerprint(),
                "source": {"files": len(listing), "sha256": shards.source_digest(listing)},
                "created_by": f"alexnet-pipeline {__version__}"}
    _counter = mp.get_context("fork").Value("q", 0)
    pool = None
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(_counter,))
    try:
        for split in cfg.splits:
            report.processed += _run_units(cfg, split, source.units[split], work, pool, workers)
            samples, skipped, moments = _collect(source.units[split], work)
            skipped += [s for s in source.skipped if s["split"] == split]
            if not samples:
                raise PrepError(f"{cfg.imagenet_root}: no usable {split} images "
                                f"({len(skipped)} files skipped; first: {skipped[:1]})")
            infos = _write_shards(cfg, split, samples, pool)
            manifest["splits"][split] = {"samples": len(samples), "shards": [asdict(i) for i in infos]}
            manifest["skipped"] += sorted(skipped, key=lambda s: s["source"])
            report.samples[split] = len(samples)
            if split == "train":
                shards.save_npz(out / shards.STATS, summarize(moments))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report.skipped = manifest["skipped"]
    shards.write_source(out, listing)  # before the manifest: a finished output has both
    shards.write_manifest(out, manifest)
    shards.write_timm_info(out, manifest)
    shutil.rmtree(work)
    report.seconds = time.perf_counter() - t0
    return report
