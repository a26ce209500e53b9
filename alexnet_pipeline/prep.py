"""alexnet-prep: ImageNet (folders or archives) -> shuffled WebDataset shards + index + stats, in one pass.

Two stages, both resumable and both independent of the worker count:

1. Work: each `Unit` (a few hundred source images) is decoded, resized, cropped and re-encoded by one worker,
   which writes one work file ``.work/<split>/<unit>.unit``: the JPEGs, then their keys, offsets, skipped
   files and exact statistics sums (a JSON header and raw sums), then a trailer with a CRC32 of it all. It
   is renamed into place whole, so its presence marks a finished unit; it is not fsynced (a small unit
   would spend most of its time there), so a resumed run checks the CRC of every work file it finds and
   redoes those a crash left short. A killed run redoes at most the units that were in flight.
2. Shards: with every unit done, the samples are sorted by key, permuted with the seed (train only: DALI's
   reader shuffles only inside a buffer) and cut into shards, each written atomically with its index.
   A shard already on disk is finished (it was renamed into place complete), so it is kept.

Output bytes depend only on the inputs and the options that change them (`PrepConfig.fingerprint`).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import __version__, files, imagenet, shards, units
from .config import OptionError, UserError, check, option, recipe_fields
from .image import BadImage, prepare
from .options import ImageNetRoot, Seed, Workers
from .stats import Moments, summarize

WORK = ".work"
SPLITS = ("train", "val")


def _quality_problem(q: int) -> str | None:
    return None if 1 <= q <= 100 else "JPEG quality is 1..100"


@dataclass
class PrepConfig(ImageNetRoot, Workers, Seed):
    """Options of alexnet-prep; `fingerprint` is the part that determines the output bytes."""

    out: Path = option(dataclasses.MISSING, "output directory for shards, dataset.json and stats.npz")
    splits: tuple[str, ...] = option(("train", "val"), "splits to prepare: train,val or one of them",
                                     choices=SPLITS, recipe=True)
    shard_size: int = option(1000, "samples per shard", minimum=1, recipe=True)
    quality: int = option(95, "JPEG quality (cuda-convnet2's 95)", validate=_quality_problem, recipe=True)
    image_size: int = option(256, "side of the prepared images (the paper's 256)", minimum=224, cli=False, recipe=True)
    limit_per_class: int | None = option(None, "keep the first N files of each class", minimum=1, recipe=True)
    layout: str = option("auto", "which layout to read when several are present: auto (folders, then the "
                         "official archives, then Hugging Face's), folders, archives or hf",
                         choices=("auto", "folders", "archives", "hf"), recipe=True)
    progress: bool | None = option(None, "progress bars (default: when stderr is a terminal)")
    rebuild: bool = option(False, "if the source changed since OUT was written, rebuild OUT from it (without "
                           "this, a changed source is refused)")
    max_image_mib: int = option(units.MAX_IMAGE_MIB, "a file larger than this (MiB) is skipped without being "
                                "read, its size named (no photograph comes near it)", minimum=1, recipe=True)

    def __post_init__(self):
        self.imagenet_root, self.out, self.splits = Path(self.imagenet_root), Path(self.out), tuple(self.splits)
        check(self)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise OptionError(f"option splits: expected train, val or train,val; got {','.join(self.splits)!r}")

    def fingerprint(self) -> dict:
        """What the output bytes depend on: the options declared recipe=True (the source by its resolved
        path), and the format version."""
        values = {name: getattr(self, name) for name in recipe_fields(PrepConfig)}
        values["imagenet_root"] = str(Path(self.imagenet_root).resolve())
        values["splits"] = list(self.splits)
        return {**values, "format_version": shards.FORMAT_VERSION}

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


class WorkerDied(Exception):
    """A worker process died (a signal, the OOM killer, a crash in native code); finished work is kept and
    the same command resumes. The message names the unit and the signal."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run; what is finished stays, and the same command resumes."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; run the same command again to resume")
        self.signum = signum


# ---- stage 1: units -> work files ---------------------------------------------------------------------

_counter: Any = None  # images done, shared with the parent for a progress bar that moves within units


def _one_blas_thread():
    """Each worker is one process per core: the statistics' dot products on one BLAS thread are 1.6x faster
    than with OpenBLAS waking a thread per core for every image (0.13 against 0.21 ms per image here)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _init_worker(counter, work: Path):
    global _counter, _busy_fd
    # First: Ctrl-C reaches the whole process group, the parent alone reports it; SIGTERM ends a worker
    # quietly (the parent's handler, inherited through fork, would raise in here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _counter = counter
    _busy_fd = os.open(_busy_path(work, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _one_blas_thread()  # applied when made, kept for the worker's life (it is never exited)


# ---- work files: .work/<split>/<unit>.unit ------------------------------------------------------------

# JPEG bytes, header bytes (JSON), CRC32 of everything before the trailer, magic
_TRAILER = struct.Struct("<QQI4s")
_MAGIC = b"APU2"


def _unit_path(work: Path, unit: units.Unit) -> Path:
    return (work / unit.name).with_suffix(".unit")  # unit names are "<split>/<part>"


def _write_unit_file(path: Path, jpegs: bytes, header: dict, moments: Moments | None) -> None:
    """One work file: the JPEGs, a JSON header (keys, labels, offsets, sizes, skipped files and the statistics'
    small sums), the per-pixel sum's raw bytes, the trailer. Plain bytes, not npz: a unit of one image
    spends its time in per-array overheads otherwise."""
    pixels = b""
    if moments is not None:
        arrays = moments.to_arrays()
        header = {**header, "n_images": int(arrays["n_images"]), "outer_sum": arrays["outer_sum"].tolist(),
                  "plane_sum": [arrays["plane_sum"].dtype.str, list(arrays["plane_sum"].shape)]}
        pixels = arrays["plane_sum"].tobytes()
    head = json.dumps(header).encode()
    body = b"".join((jpegs, head, pixels))
    files.atomic_write(path, body + _TRAILER.pack(len(jpegs), len(head), zlib.crc32(body), _MAGIC), durable=False)


def _unit_contents(path: Path) -> tuple[dict, Moments | None]:
    """The header and statistics of a work file (its JPEGs stay on disk, at the offsets the header lists)."""
    with open(path, "rb") as f:
        f.seek(-_TRAILER.size, os.SEEK_END)
        end = f.tell()
        n_jpeg, n_head = _TRAILER.unpack(f.read(_TRAILER.size))[:2]
        f.seek(n_jpeg)
        rest = f.read(end - n_jpeg)
    header = json.loads(rest[:n_head])
    if "plane_sum" not in header:
        return header, None
    dtype, shape = header["plane_sum"]
    arrays = {"n_images": header["n_images"], "outer_sum": np.array(header["outer_sum"], np.int64),
              "plane_sum": np.frombuffer(rest, dtype, offset=n_head).reshape(shape)}
    return header, Moments.from_arrays(arrays)


def _unit_file_intact(path: Path) -> bool:
    """Whether a work file is whole: its trailer and the CRC32 of its contents (what a crash before the
    page cache reached the disk would break)."""
    data = path.read_bytes()
    if len(data) < _TRAILER.size:
        return False
    n_jpeg, n_head, crc, magic = _TRAILER.unpack(data[-_TRAILER.size:])
    return (magic == _MAGIC and n_jpeg + n_head <= len(data) - _TRAILER.size
            and zlib.crc32(data[:-_TRAILER.size]) == crc)


_busy_fd: int | None = None  # a worker's note of what it is preparing, .work/.busy-PID (read when it dies)


def _busy_path(work: Path, pid: int) -> Path:
    return work / f".busy-{pid}"


def _note_busy(what: str) -> None:
    if _busy_fd is not None:  # workers only: the serial path has no pool to lose
        os.ftruncate(_busy_fd, 0)
        os.pwrite(_busy_fd, what.encode(), 0)


def process_unit(unit: units.Unit, work: Path, size: int, quality: int,
                 max_bytes: int = units.MAX_IMAGE_MIB * 2**20) -> tuple[int, int]:
    """Prepare every image of `unit` into its work file; returns (usable, skipped)."""
    _note_busy(unit.name)
    keys, labels, offsets, sizes, skipped = [], [], [], [], []
    moments = Moments(size) if unit.split == "train" else None
    out = io.BytesIO()  # a unit is at most one class (~1,300 images, ~40 MB of JPEGs)
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
                offsets.append(out.tell())
                sizes.append(len(jpeg))
                out.write(jpeg)
                keys.append(item.key)
                labels.append(item.label)
                if moments is not None:
                    moments.add_planes(pixels)
            if _counter is not None:
                with _counter.get_lock():
                    _counter.value += 1
    except units.ARCHIVE_ERRORS as e:
        # a damaged archive loses the rest of this unit only; what was read so far is kept
        skipped.append({"split": unit.split, "source": unit.where,
                        "reason": f"archive unreadable after {len(keys) + len(skipped)} files: {e}"})
    header = {"keys": keys, "labels": labels, "offsets": offsets, "sizes": sizes, "skipped": skipped}
    _write_unit_file(_unit_path(work, unit), out.getvalue(), header, moments)
    _note_busy("")
    return len(keys), len(skipped)


class _Pool:
    """The worker processes (fork), with what multiprocessing.Pool lacks: a worker that dies stops the run
    (ProcessPoolExecutor breaks instead of waiting forever for the lost unit), named with its unit and signal."""

    def __init__(self, workers: int, work: Path):
        self.work = work
        self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                            initargs=(_counter, work))
        self._processes: dict = {}

    def submit(self, fn, *args):
        future = self.executor.submit(fn, *args)
        # the executor forgets its processes once broken: keep them, to name the one that died
        self._processes.update(getattr(self.executor, "_processes", None) or {})
        return future

    def died(self) -> WorkerDied:
        """The error of a broken pool: which worker died, how, and what it was preparing."""
        dead = []
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()  # the executor stops the others too; this bounds the joins below
        for pid, process in self._processes.items():
            process.join(timeout=5)
            code = process.exitcode
            if code not in (None, 0):
                dead.append((code == -signal.SIGTERM, pid, code))  # the others were terminated after it
        if not dead:
            return WorkerDied("a worker process died; finished work is kept: run the same command again to resume")
        _, pid, code = min(dead)
        how = signal.Signals(-code).name if code < 0 else f"exit status {code}"
        busy = _busy_path(self.work, pid)
        what = busy.read_text() if busy.exists() else ""
        doing = f" while preparing {what}" if what else ""
        return WorkerDied(f"worker {pid} died ({how}){doing}; finished work is kept: run the same command again "
                          "to resume")

    def close(self) -> None:
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()  # a signal or an error: stop at once, unfinished units are redone
        self.executor.shutdown(wait=True, cancel_futures=True)
        for busy in self.work.glob(".busy-*"):
            busy.unlink()


def _run_units(cfg: PrepConfig, split: str, planned: list, work: Path, pool: _Pool | None, workers: int,
               resumed: bool) -> int:
    """Process the units of `split` not yet done (on a resumed run, a work file must also be intact); returns
    how many images were processed. At most two units per worker are in flight (a unit read from a .tar.gz
    carries its images' bytes)."""
    def done(u):
        path = _unit_path(work, u)
        return path.exists() and (not resumed or _unit_file_intact(path))
    todo = [u for u in planned if not done(u)]
    if not todo:
        return 0
    (work / split).mkdir(parents=True, exist_ok=True)
    known = [u.expected for u in todo]
    counter = _counter
    counter.value = 0
    bar = _bar(cfg, None if None in known else sum(known), f"{split} images", "img")
    max_bytes = cfg.max_image_mib * 2**20
    jobs = units.with_payloads(todo, queue_size=2 * workers, max_bytes=max_bytes)
    try:
        if pool is None:
            with _one_blas_thread():
                for unit in jobs:
                    process_unit(unit, work, cfg.image_size, cfg.quality, max_bytes)
                    bar.update(counter.value - bar.n)
        else:
            in_flight: collections.deque = collections.deque()
            for unit in jobs:
                in_flight.append(pool.submit(process_unit, unit, work, cfg.image_size, cfg.quality, max_bytes))
                while len(in_flight) >= 2 * workers:
                    _wait(in_flight.popleft(), pool, lambda: bar.update(counter.value - bar.n))
            while in_flight:
                _wait(in_flight.popleft(), pool, lambda: bar.update(counter.value - bar.n))
    finally:
        jobs.close()  # stops the archive readers at once if a unit failed or a signal came
        bar.close()
    return counter.value


def _wait(future, pool: _Pool, tick=lambda: None):
    """The result of one task (re-raising its worker's exception, or WorkerDied if a worker died), calling
    `tick` (a progress bar) while it is in flight."""
    while True:
        try:
            result = future.result(timeout=0.25)
            break
        except FutureTimeout:
            tick()
        except BrokenProcessPool:
            raise pool.died() from None
    tick()
    return result


# ---- stage 2: work files -> shards --------------------------------------------------------------------

def _collect(planned: list, work: Path):
    """The Prepared samples of all units, the skipped files, and the merged moments."""
    samples, skipped, moments = [], [], None
    seen: dict[str, str] = {}
    for u in planned:
        path = _unit_path(work, u)
        z, part = _unit_contents(path)
        skipped += z["skipped"]
        for key, label, off, size in zip(z["keys"], z["labels"], z["offsets"], z["sizes"], strict=True):
            if key in seen:
                skipped.append({"split": u.split, "source": f"{u.name}:{key}",
                                "reason": f"duplicate sample key (kept the one from {seen[key]})"})
                continue
            seen[key] = u.name
            samples.append(Prepared(key, int(label), str(path), int(off), int(size)))
        if part is not None:
            if moments is None:
                moments = part
            else:
                moments.merge(part)
    return samples, skipped, moments


@dataclass(frozen=True)
class Prepared:
    """Where a prepared sample waits for its shard: its JPEG at `offset` in the work file `path`."""

    key: str
    label: int
    path: str
    offset: int
    size: int


def _write_shard_task(args) -> shards.ShardInfo:
    path, members = args
    if path.exists():  # renamed into place complete by an earlier run
        return shards.describe_shard(path)
    _note_busy(path.name)
    opened: dict[str, BinaryIO] = {}

    def read(p: Prepared) -> bytes:
        f = opened.get(p.path) or opened.setdefault(p.path, open(p.path, "rb"))
        f.seek(p.offset)
        return f.read(p.size)

    try:
        return shards.write_shard(path, (shards.Sample(p.key, read(p), p.label) for p in members))
    finally:
        for f in opened.values():
            f.close()
        _note_busy("")


def _write_shards(cfg: PrepConfig, split: str, samples, pool) -> list[shards.ShardInfo]:
    samples.sort(key=lambda s: s.key)
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    out = Path(cfg.out) / split
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(out / f"{split}-{i // cfg.shard_size:06d}.tar", samples[i:i + cfg.shard_size])
             for i in range(0, len(samples), cfg.shard_size)]
    bar = _bar(cfg, len(tasks), f"{split} shards", "shard")
    infos = []
    try:
        if pool is None:
            for info in map(_write_shard_task, tasks):
                infos.append(info)
                bar.update(1)
        else:
            in_flight = collections.deque(pool.submit(_write_shard_task, t) for t in tasks)
            while in_flight:
                infos.append(_wait(in_flight.popleft(), pool))
                bar.update(1)
    finally:
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
    return PrepReport({s: e.samples for s, e in manifest.splits.items()}, manifest.skipped, 0,
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
    manifest = shards.Manifest(
        format_version=shards.FORMAT_VERSION, image_size=cfg.image_size, jpeg_quality=cfg.quality,
        classes=source.classes,
        class_names={w: source.class_names[w] for w in source.classes if w in source.class_names},
        layout=source.layout, splits={}, skipped=[], fingerprint=cfg.fingerprint(),
        source={"files": len(listing), "sha256": shards.source_digest(listing)},
        created_by=f"alexnet-pipeline {__version__}")
    _counter = mp.get_context("fork").Value("q", 0)
    pool = _Pool(workers, work) if workers > 1 else None
    try:
        for split in cfg.splits:
            report.processed += _run_units(cfg, split, source.units[split], work, pool, workers, report.resumed)
            samples, skipped, moments = _collect(source.units[split], work)
            skipped += [s for s in source.skipped if s["split"] == split]
            if not samples:
                raise PrepError(f"{cfg.imagenet_root}: no usable {split} images "
                                f"({len(skipped)} files skipped; first: {skipped[:1]})")
            infos = _write_shards(cfg, split, samples, pool)
            manifest.splits[split] = shards.SplitInfo(len(samples), infos)
            shards.remember_intact(out, split, infos, shards.shard_paths(out, split, manifest))
            manifest.skipped += sorted(skipped, key=lambda s: s["source"])
            report.samples[split] = len(samples)
            if split == "train":
                shards.save_npz(out / shards.STATS, summarize(moments))
    finally:
        if pool is not None:
            pool.close()
    report.skipped = manifest.skipped
    shards.write_source(out, listing)  # before the manifest: a finished output has both
    shards.write_manifest(out, manifest)
    shards.write_timm_info(out, manifest)
    shutil.rmtree(work)
    report.seconds = time.perf_counter() - t0
    return report
