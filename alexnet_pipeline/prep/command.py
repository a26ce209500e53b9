"""alexnet-prep: ImageNet (folders or archives) -> shuffled WebDataset shards + index + stats, in one pass.

Two stages, both resumable and both independent of the worker count:

1. Work: each `Unit` (64 source images, or one class archive) is decoded, resized, cropped and re-encoded by
   one worker, which writes one work file ``.work/<split>/<unit>.unit`` (workfiles.py) holding the unit's
   JPEGs in the split's order: train by a seeded order key (a keyed hash of the sample key, so each sample's
   place in the global shuffle is known when its image is prepared), val by key. A killed run redoes at
   most the units that were in flight; a resumed run checks every work file's CRC, in the pool.
2. Shards: with every unit done, the workers read the work files' headers (and merge the statistics); the
   parent sorts the samples into the split's order and cuts shards, each written atomically with its index
   by a worker that reads its samples one work file at a time, front to back (every work file is in the same
   order as the shards), so a worker holds at most two files open whatever the shard size. A shard already
   on disk is finished (it was renamed into place complete), so it is kept.

Output bytes depend only on the inputs and the options that change them (`PrepConfig.fingerprint`).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .. import __version__, files, shards, storage, verified
from ..config import OptionError, UserError, check, option, recipe_fields
from ..image import BadImage, prepare
from ..options import ImageNetRoot, Seed, Storage, Workers
from ..progress import Progress, Stage, mode
from . import imagenet, listing, units, workers, workfiles
from .publish import Published, publish
from .stats import Moments, summarize
from .workers import WorkerDied

WORK = ".work"
SPLITS = ("train", "val")
__all__ = ["PrepConfig", "PrepReport", "PrepError", "WorkerDied", "Interrupted", "OutOfFiles", "run", "WORK"]


def _quality_problem(q: int) -> str | None:
    return None if 1 <= q <= 100 else "JPEG quality is 1..100"


@dataclass
class PrepConfig(ImageNetRoot, Workers, Seed, Storage):
    """Options of alexnet-prep; `fingerprint` is the part that determines the output bytes."""

    out: Path | str = option(dataclasses.MISSING, "output directory for shards, dataset.json and stats.npz, or a "
                             "URL in a store (s3://bucket/prefix, ...): prep then runs in --work-dir and uploads, "
                             "the manifest last")
    splits: tuple[str, ...] = option(("train", "val"), "splits to prepare: train,val or one of them",
                                     choices=SPLITS, recipe=True)
    shard_size: int = option(1000, "samples per shard", minimum=1, recipe=True)
    quality: int = option(95, "JPEG quality (cuda-convnet2's 95)", validate=_quality_problem, recipe=True)
    image_size: int = option(256, "side of the prepared images (the paper's 256)", minimum=224, cli=False, recipe=True)
    limit_per_class: int | None = option(None, "keep the first N files of each class", minimum=1, recipe=True)
    layout: str = option("auto", "which layout to read when several are present: auto (folders, then the "
                         "official archives, then Hugging Face's), folders, archives or hf",
                         choices=("auto", "folders", "archives", "hf"), recipe=True)
    progress: bool | None = option(None, "progress bars (default: bars when stderr is a terminal, else a line "
                                   "every --progress-every seconds); --no-progress: neither")
    progress_every: float = option(30.0, "seconds between progress lines when stderr is not a terminal (logs, "
                                   "nohup, Slurm)", minimum=0.01)
    rebuild: bool = option(False, "if the source changed since OUT was written, rebuild OUT from it (without "
                           "this, a changed source is refused)")
    max_image_mib: int = option(units.MAX_IMAGE_MIB, "a file larger than this (MiB) is skipped without being "
                                "read, its size named (no photograph comes near it)", minimum=1, recipe=True)
    work_dir: Path | None = option(None, "with --out URL: the local directory prep works in, resumable (default "
                                   "~/.cache/alexnet-pipeline/prep/<a directory per URL>)")

    def __post_init__(self):
        self.imagenet_root, self.splits = Path(self.imagenet_root), tuple(self.splits)
        check(self)
        self.out = storage.location(self.out)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise OptionError(f"option splits: expected train, val or train,val; got {','.join(self.splits)!r}")

    def fingerprint(self) -> dict:
        """What the output bytes depend on: the options declared recipe=True (the source by its resolved
        path), and the format version."""
        values = {name: getattr(self, name) for name in recipe_fields(PrepConfig)}
        values["imagenet_root"] = str(Path(self.imagenet_root).resolve())
        values["splits"] = list(self.splits)
        return {**values, "format_version": shards.FORMAT_VERSION}

    @property
    def local_out(self) -> Path:
        """Where prep writes: --out, or for a URL the work directory it publishes from."""
        if not storage.is_url(self.out):
            return Path(self.out)
        if self.work_dir is not None:
            return Path(self.work_dir)
        return storage.default_cache_root() / "prep" / hashlib.sha256(str(self.out).encode()).hexdigest()[:16]

    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def progress_for(self, name: str, total: int | None, unit: str) -> Progress:
        return Progress(name, total, unit, mode(self.progress), self.progress_every)


@dataclass
class PrepReport:
    """What a run did, for the summary line and for benchmarks."""

    samples: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    processed: int = 0  # images decoded in this run (0 when everything was already done)
    seconds: float = 0.0
    resumed: bool = False
    notes: list[str] = field(default_factory=list)  # said once in the summary (e.g. workers capped)
    stages: list[Stage] = field(default_factory=list)  # each stage's count and time
    published: Published | None = None  # with --out URL: what was uploaded


class PrepError(UserError):
    """A problem with the whole run (not one image): wrong tree, clashing output directory, nothing usable."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run; what is finished stays, and the same command resumes."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; run the same command again to resume")
        self.signum = signum


class OutOfFiles(Exception):
    """The process's open-file limit or the system's file table refused a file: not the input's fault; the
    message names the limit and the remedy, and the same command resumes."""


def order_key(key: str, seed: int) -> int:
    """A sample's place in the train split's global shuffle: a 64-bit keyed hash of its key. It depends on the
    key and the seed alone, so a worker knows it while preparing the image (and writes its work file in that
    order), whatever else the split holds."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "big")


class Prepared(NamedTuple):
    """An image prepared in a worker, before its unit's work file is written (sorted into the split's order)."""

    order: int  # order_key for train, 0 for val (so key order)
    key: str
    label: int
    jpeg: bytes


class Row(NamedTuple):
    """A sample as the shard stage plans the split: sorted, the rows are the split's order (the global shuffle
    for train, key order for val). One per image: 1.28M for ImageNet's train split, as plain as a tuple."""

    order: int  # as Prepared.order
    key: str
    label: int
    unit: int  # index of its unit (and work file) in the split's plan
    offset: int  # where its JPEG sits in that work file
    size: int


class Member(NamedTuple):
    """A sample of one shard to write: its JPEG at `offset` in `work_file` (a path: a worker's task)."""

    key: str
    label: int
    work_file: str
    offset: int
    size: int


# ---- stage 1: units -> work files ---------------------------------------------------------------------

def _unit_path(work: Path, unit: units.Unit) -> Path:
    return (work / unit.name).with_suffix(workfiles.SUFFIX)  # unit names are "<split>/<part>"


def process_unit(unit: units.Unit, work: Path, size: int, quality: int, seed: int = 0,
                 max_bytes: int = units.MAX_IMAGE_MIB * 2**20) -> tuple[int, int]:
    """Prepare every image of `unit` into its work file, in the split's order; returns (usable, skipped)."""
    workers.note_busy(unit.name)
    prepared, skipped = [], []
    moments = Moments(size) if unit.split == "train" else None
    try:
        for item in unit.items(max_bytes):
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
                order = order_key(item.key, seed) if unit.split == "train" else 0
                prepared.append(Prepared(order, item.key, item.label, jpeg))
                if moments is not None:
                    moments.add_planes(pixels)
            workers.count()
    except units.ARCHIVE_ERRORS as e:
        # a damaged archive loses the rest of this unit only; what was read so far is kept
        skipped.append({"split": unit.split, "source": unit.where,
                        "reason": f"archive unreadable after {len(prepared) + len(skipped)} files: {e}"})
    prepared.sort(key=lambda p: (p.order, p.key))  # the split's order: the shard stage reads the file in turn
    header = {"keys": [p.key for p in prepared], "labels": [p.label for p in prepared], "skipped": skipped}
    workfiles.write(_unit_path(work, unit), [p.jpeg for p in prepared], header, moments)
    workers.hold("units", work)  # (a test hook) with the unit's work file written, before the note is cleared
    workers.note_busy("")
    return len(prepared), len(skipped)


def _intact(path: Path) -> bool:
    return path.exists() and workfiles.intact(path)


def _intact_all(paths: list[Path]) -> list[bool]:
    return [_intact(p) for p in paths]


def _run_units(cfg: PrepConfig, split: str, planned: list, work: Path, pool: workers.Pool | workers.Serial,
               resumed: bool) -> tuple[int, list[Stage]]:
    """Process the units of `split` not yet done (on a resumed run, a work file must also be intact: checked
    in the pool); returns (images processed, stages)."""
    paths = [_unit_path(work, u) for u in planned]
    found = [p.exists() for p in paths]
    stages = []
    if resumed and any(found):
        checking = cfg.progress_for(f"{split} check", sum(found), "files")
        on_disk = [p for p, f in zip(paths, found, strict=True) if f]
        chunks = [on_disk[k:k + 16] for k in range(0, len(on_disk), 16)]
        checked = pool.imap(_intact_all, chunks, 4 * pool.size)
        ok: dict[Path, bool] = {}
        for chunk, verdicts in zip(chunks, checked, strict=True):
            ok.update(zip(chunk, verdicts, strict=True))
            checking.update(len(chunk))
        stages.append(checking.close())
        found = [f and ok[p] for p, f in zip(paths, found, strict=True)]
    todo = [u for u, f in zip(planned, found, strict=True) if not f]
    if not todo:
        return 0, stages
    (work / split).mkdir(parents=True, exist_ok=True)
    known = [u.expected for u in todo]
    counter = workers.counter
    counter.value = 0
    bar = cfg.progress_for(f"{split} images", None if None in known else sum(known), "images")
    max_bytes = cfg.max_image_mib * 2**20
    jobs = units.with_payloads(todo, queue_size=2 * pool.size, max_bytes=max_bytes)
    try:
        # at most two units per worker in flight: a unit read from a .tar.gz carries its images' bytes
        for _ in pool.imap(_process, ((u, work, cfg.image_size, cfg.quality, cfg.seed, max_bytes) for u in jobs),
                           2 * pool.size, lambda: bar.to(counter.value)):
            pass
    finally:
        jobs.close()  # stops the archive readers at once if a unit failed or a signal came
        stages.append(bar.close())
    return counter.value, stages


def _process(args) -> tuple[int, int]:
    return process_unit(*args)


# ---- stage 2: work files -> shards --------------------------------------------------------------------

def _headers(args) -> tuple[list[Row], list[dict], Moments | None]:
    """In a worker: the samples, skipped files and merged statistics of a run of work files."""
    items, seed = args
    rows, skipped, moments = [], [], None
    for i, path, train in items:
        header, part = workfiles.read_header(path)
        skipped += header["skipped"]
        for key, label, off, size in zip(header["keys"], header["labels"], header["offsets"], header["sizes"],
                                         strict=True):
            rows.append(Row(order_key(key, seed) if train else 0, key, int(label), i, int(off), int(size)))
        moments = _merged(moments, part)
    return rows, skipped, moments


def _merged(moments: Moments | None, part: Moments | None) -> Moments | None:
    if moments is None or part is None:
        return moments or part
    moments.merge(part)
    return moments


def _collect(planned: list, work: Path, seed: int, pool: workers.Pool | workers.Serial):
    """The split's samples in its order, the work file of each unit, the skipped files and the statistics."""
    paths = [str(_unit_path(work, u)) for u in planned]
    chunks = [([(i, paths[i], u.split == "train") for i in range(k, min(k + 64, len(planned)))], seed)
              for k, u in enumerate(planned) if k % 64 == 0]
    parts = pool.map(_headers, chunks)
    samples: list[Row] = []
    skipped: list[dict] = []
    moments: Moments | None = None
    seen: dict[str, str] = {}
    for rows, part_skipped, part in parts:
        skipped += part_skipped
        for row in rows:
            key, unit = row.key, planned[row.unit].name
            if key in seen:
                skipped.append({"split": planned[row.unit].split, "source": f"{unit}:{key}",
                                "reason": f"duplicate sample key (kept the one from {seen[key]})"})
                continue
            seen[key] = unit
            samples.append(row)
        moments = _merged(moments, part)
    samples.sort()  # (order key, key): the global shuffle for train, key order for val
    return samples, paths, skipped, moments


def _done_path(work: Path, shard: Path) -> Path:
    return work / shard.parent.name / f"{shard.name}.done"


def _write_shard_task(args) -> shards.ShardInfo:
    """In a worker: one shard from its samples (Member), read one work file at a time in ascending offset
    order. A shard already on disk is described from the note its writer left (or
    re-hashed, if the note is missing or stale)."""
    path, members, work = args
    done = _done_path(work, path)
    if path.exists():  # renamed into place complete by an earlier run
        try:
            size, mtime, info = json.loads(done.read_text())
            st = path.stat()
            if [st.st_size, st.st_mtime_ns] == [size, mtime]:
                return shards.ShardInfo(**info)
        except (OSError, ValueError, TypeError):
            pass
        return shards.describe_shard(path)
    workers.note_busy(path.name)
    jpegs: list[bytes] = [b""] * len(members)
    by_file: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_file.setdefault(m.work_file, []).append(i)
    for work_file in sorted(by_file):
        idx = by_file[work_file]  # ascending offsets: every work file is in the shard order
        for i, data in zip(idx, workfiles.read_jpegs(work_file, [(members[i].offset, members[i].size) for i in idx]),
                           strict=True):
            jpegs[i] = data
    info = shards.write_shard(path, (shards.Sample(m.key, j, m.label) for m, j in zip(members, jpegs, strict=True)))
    st = path.stat()
    files.atomic_write(done, json.dumps([st.st_size, st.st_mtime_ns, dataclasses.asdict(info)]).encode(),
                       durable=False)
    workers.hold("shards", work)
    workers.note_busy("")
    return info


def _write_shards(cfg: PrepConfig, split: str, samples: list[Row], paths: list[str], work: Path,
                  pool) -> tuple[list, Stage]:
    out = Path(cfg.out) / split
    out.mkdir(parents=True, exist_ok=True)
    tasks = ((out / f"{split}-{k // cfg.shard_size:06d}.tar",
              [Member(s.key, s.label, paths[s.unit], s.offset, s.size) for s in samples[k:k + cfg.shard_size]], work)
             for k in range(0, len(samples), cfg.shard_size))
    bar = cfg.progress_for(f"{split} shards", -(-len(samples) // cfg.shard_size), "shards")
    infos = []
    try:
        for info in pool.imap(_write_shard_task, tasks, 2 * pool.size):
            infos.append(info)
            bar.update(1)
    finally:
        stage = bar.close()
    return infos, stage


# ---- the run --------------------------------------------------------------------------------------------

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
    if any(p.name not in (files.LOCK, listing.ARCHIVES) for p in out.iterdir()):
        raise PrepError(f"{out}: exists, is not empty and was not written by alexnet-prep")
    return False


# A full disk, a read-only or forbidden place: one line naming the file; the rerun resumes.
DISK_ERRNOS = files.DISK_ERRNOS | {errno.ENOTDIR, errno.ENAMETOOLONG}


def run(cfg: PrepConfig) -> PrepReport:
    """Run (or resume) a prep; returns the report. Raises UserError subclasses (PrepError, LayoutError) for
    the whole run, Interrupted on SIGTERM/SIGINT (Ctrl-C), WorkerDied and OutOfFiles."""
    def on_term(signum, frame):
        raise Interrupted(signum)

    old_handler = signal.signal(signal.SIGTERM, on_term)
    files.raise_open_file_limit()
    try:
        if not storage.is_url(cfg.out):
            return _run(cfg)
        storage.configure(cfg.storage_timeout)
        store = storage.store(str(cfg.out))
        store.check()  # no credentials or no bucket: named before any work
        report = _run(dataclasses.replace(cfg, out=cfg.local_out))
        bar = cfg.progress_for("upload", None, "files")
        report.published = publish(cfg.local_out, store.url, progress=bar)
        report.stages.append(bar.close())
        return report
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    except OSError as e:
        if e.errno in files.OPEN_FILE_ERRNOS:
            raise OutOfFiles(files.open_files_error(e)) from None
        if e.errno in DISK_ERRNOS:
            raise PrepError(f"{e.filename or 'output'}: {e.strerror}; fix that and run the same command again to "
                            "resume (finished work is kept)") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)


def _changed(cfg: PrepConfig, digest: str | None, stored: Path, new: listing.Listing, what: str) -> bool:
    """Whether the source differs from the one a run was started or finished with (its listing's `digest`,
    the listing itself in `stored`). Without --rebuild a difference is refused in one line that says what
    changed."""
    if digest == new.digest():
        return False
    try:
        old = listing.read(stored)
    except listing.ListingError as e:
        raise PrepError(f"{e}; run again with --rebuild") from None
    changes = listing.changes(old, new) if old is not None else "no record of its source"
    if not cfg.rebuild:
        raise PrepError(f"{cfg.imagenet_root}: changed since {cfg.out} was {what} ({changes or 'its listing'}); run "
                        f"again with --rebuild to rebuild {cfg.out} from it, or use another --out")
    return True


def _clear(out: Path) -> None:
    """Remove a previous run's outputs (for --rebuild), leaving the lock and the archive cache."""
    for p in out.iterdir():
        if p.name not in (files.LOCK, listing.ARCHIVES):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _start(cfg: PrepConfig, found: listing.Listing) -> bool:
    """Create OUT/.work with its plan and source listing, or check that a resumed run reads the same
    source; True if resumed."""
    out, work = Path(cfg.out), Path(cfg.out) / WORK
    if work.exists():
        plan = json.loads((work / "plan.json").read_text())
        if not _changed(cfg, plan.get("source"), work, found, "started"):
            files.remove_partials(out)  # files a killed run was writing; their units/shards are redone
            return True
        _clear(out)
    work.mkdir(parents=True)
    listing.write(work, found)
    plan = {"fingerprint": cfg.fingerprint(), "source": found.digest()}
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
            out.rmdir()  # a run that failed before writing anything leaves no directory behind (the archive
            # cache, if it listed archives, stays: the next run need not decompress them again)
        raise


def _finished_report(cfg: PrepConfig, t0: float, manifest: shards.Manifest, stages: list[Stage]) -> PrepReport:
    out = Path(cfg.out)
    shutil.rmtree(out / WORK, ignore_errors=True)  # a run stopped right after its manifest left its work files
    if not (out / shards.TIMM_INFO).exists():  # written after the manifest
        shards.write_timm_info(out, manifest)
    return PrepReport({s: e.samples for s, e in manifest.splits.items()}, manifest.skipped, 0,
                      time.perf_counter() - t0, resumed=True, stages=stages)


def _find(cfg: PrepConfig) -> tuple[imagenet.Source, Stage]:
    """The source, its folders listed by a pool of this machine's cores (the workers proper start later, once
    the number of units is known)."""
    out = Path(cfg.out)
    stage = cfg.progress_for("listing", None, "files")
    n = min(cfg.n_workers(), len(os.sched_getaffinity(0)))
    cache = listing.ArchiveCache(out)
    try:
        with workers.pool(n, out / WORK) as pool:
            source = imagenet.find(cfg.imagenet_root, cfg.splits, cfg.layout, cfg.limit_per_class, cache=cache,
                                   map_=lambda fn, items: pool.map(fn, list(items), chunksize=8))
    finally:
        cache.save()  # also what was listed before a failure: entries are keyed on each archive's size and time
    stage.to(len(source.listing))
    return source, stage.close()


def _locked_run(cfg: PrepConfig) -> PrepReport:
    t0 = time.perf_counter()
    out, work = Path(cfg.out), Path(cfg.out) / WORK
    finished = _check_out(cfg)
    source, listed = _find(cfg)
    found = source.listing
    if finished:
        manifest = shards.load_manifest(out)
        if not _changed(cfg, manifest.source.get("sha256"), out, found, "written"):
            return _finished_report(cfg, t0, manifest, [listed])
        _clear(out)
    report = PrepReport(resumed=_start(cfg, found), notes=list(source.notes), stages=[listed])
    n_units = sum(len(u) for u in source.units.values())
    n = min(cfg.n_workers(), n_units)
    if n < cfg.n_workers():
        report.notes.append(f"{n} workers, not {cfg.n_workers()}: there are {n_units} units of work")
    manifest = shards.Manifest(
        format_version=shards.FORMAT_VERSION, image_size=cfg.image_size, jpeg_quality=cfg.quality,
        classes=source.classes,
        class_names={w: source.class_names[w] for w in source.classes if w in source.class_names},
        layout=source.layout, splits={}, skipped=[], fingerprint=cfg.fingerprint(),
        source={"files": len(found), "sha256": found.digest()}, created_by=f"alexnet-pipeline {__version__}")
    workers.counter = mp.get_context("fork").Value("q", 0)
    gc.collect()
    gc.freeze()  # the listing and units stay shared with the workers: the collector never touches their pages
    try:
        with workers.pool(n, work, workers.counter) as pool:
            for split in cfg.splits:
                planned = source.units.pop(split)  # gone with this split: ImageNet's train units are 1.28M entries
                processed, stages = _run_units(cfg, split, planned, work, pool, report.resumed)
                report.processed += processed
                report.stages += stages
                t1 = time.perf_counter()
                samples, paths, skipped, moments = _collect(planned, work, cfg.seed, pool)
                report.stages.append(Stage(f"{split} work files", len(paths), "files", time.perf_counter() - t1))
                skipped += [s for s in source.skipped if s["split"] == split]
                if not samples:
                    raise PrepError(f"{cfg.imagenet_root}: no usable {split} images "
                                    f"({len(skipped)} files skipped; first: {skipped[:1]})")
                infos, stage = _write_shards(cfg, split, samples, paths, work, pool)
                report.stages.append(stage)
                manifest.splits[split] = shards.SplitInfo(len(samples), infos)
                verified.remember_intact(out, split, infos, shards.shard_paths(out, split, manifest))
                manifest.skipped += sorted(skipped, key=lambda s: s["source"])
                report.samples[split] = len(samples)
                if split == "train":
                    shards.save_npz(out / shards.STATS, summarize(moments))
                del samples, planned
    finally:
        gc.unfreeze()
    report.skipped = manifest.skipped
    listing.write(out, found)  # before the manifest: a finished output has both
    shards.write_manifest(out, manifest)
    shards.write_timm_info(out, manifest)
    shutil.rmtree(work)
    report.seconds = time.perf_counter() - t0
    return report

