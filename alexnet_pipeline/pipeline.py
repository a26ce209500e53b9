"""The DALI pipelines (the only module that imports DALI) and the torch loaders around them.

We own the sample order (order.py); DALI does what it is best at, decoding and the augmentation graph. Each
DALI run's samples come from one external source: the sample reader (reader.py) hands over views of the JPEG
bytes in whole shards mapped into memory, from the shards directory or, for shards in a store (s3://, gs://,
...), from the node cache (cache.py) that fetches them ahead in this node's reading order. So a checkpoint is
(epoch, step), and a run resumes at the same place on another number of ranks.

Train: decode (nvJPEG via ``mixed`` on a GPU, or libjpeg-turbo on CPU threads), then a single fused
``crop_mirror_normalize`` pass does crop, flip, mean subtraction, lighting, layout and cast: the lighting
shift is a per-image constant per channel, so it folds into a per-sample mean (docs/design.md). The per-image
draws come with the samples, for the whole run at once, from a counter-based generator keyed on the seed,
the epoch and each sample's position in the epoch's order (``draws="host"``: the same on any number of
ranks), or from DALI's random operators (``draws="dali"``). One switch, ``device``, picks where the
augmentation runs.

Eval: the center crop, or the ten crops stacked as [10, 3, 224, 224] per image. Across ranks every image is
seen exactly once: the last step is padded to a whole global batch, and those positions carry label
PAD_LABEL (-100, torch's default ignore_index).

A DALI run may hold several batches (``batches_per_run``): the loader slices it into batches in order, so
the batches, their padding marks and the data position are the same as with one batch per run.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import queue
import threading
import time
import typing
import weakref
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorCPU, TensorListCPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from . import augment, shards, storage, verified
from .cache import NodeCache, directory, node_ranks
from .config import OptionError, documented_fields
from .options import LoaderConfig
from .order import Order, Split
from .reader import PAD_LABEL, SampleReader
from .shards import ShardError
from .storage import StoreGone

__all__ = ["Loader", "LoaderConfig", "PAD_LABEL", "ShardError", "StoreGone", "build_pipeline", "train_loader",
           "eval_loader", "exposed_names"]
PREPARED = 2  # runs the samples' thread prepares ahead of DALI's calls
DAMAGE_SEARCH_SECONDS = 120  # after a DALI failure, how long this rank may hash its shards to name a damaged one


def _base_mean(cfg: LoaderConfig, stats: dict) -> np.ndarray:
    """What crop_mirror_normalize subtracts before lighting: mean_rgb (channel mode) or nothing (pixel mode,
    whose mean image is subtracted after the pass)."""
    return (stats["mean_rgb"] if cfg.mean == "channel" else np.zeros(3)).astype(np.float32)


def _lighting_columns(cfg: LoaderConfig, stats: dict) -> np.ndarray:
    """shift = columns @ alpha: the eigenvectors scaled by the lighting form's per-axis magnitude."""
    return stats["eigvec"] * augment.lighting_scale(stats["eigval"], cfg.lighting_form)


# ---- the samples and draws of each run ------------------------------------------------------------------

class Source:
    """The external sources of the graph, per DALI run: this rank's JPEGs and labels (reader.py; `samples`)
    and, with host draws, every sample's crop offsets (as fractions of the span), flip and per-sample mean
    (base mean minus the lighting shift), keyed on (seed, epoch) and the sample's position in the epoch's
    order (`draws`).

    A thread prepares the samples of the runs in order, `depth` ahead, so that DALI's call (made in the thread
    that calls pipe.run, before it waits) only takes what is ready: read in DALI's call, they held back the
    queueing of the next run and cost 7% of the CPU loader's images/s (measured). The draws are computed in
    DALI's call: they are cheap, and DALI may call one external source several times before the other. Each
    counts the runs itself, so a loader can start at any saved step and jump to the next epoch (`jump`: what
    was prepared is dropped). The samples are views into mapped shards, handed to DALI without a copy
    (no_copy): the reader alone 1.54x as fast, the whole CPU train graph the same (tools/no_copy_ab.py). DALI
    reads them until prefetch runs later, so the runs handed over lately are kept (`recent`), and with them the
    maps their views hold. An error while preparing (a store gone, a changed object) is raised from DALI's call
    for that run."""

    def __init__(self, cfg: LoaderConfig, split: Split, reader: SampleReader, stats: dict, span: int,
                 host_draws: bool, alphas: bool, cache: NodeCache | None, depth: int = PREPARED):
        self.cfg, self.split, self.reader, self.span, self.cache = cfg, split, reader, span, cache
        self.host_draws, self.alphas = host_draws, alphas
        self.base, self.columns = _base_mean(cfg, stats), _lighting_columns(cfg, stats).astype(np.float64)
        self.runs = -(-split.steps // cfg.per_run)  # runs per epoch
        self.calls = 0  # DALI's calls for samples
        # the runs DALI was given lately (Batch, TensorListCPU): alive while DALI may read them without a copy,
        # and their shards searched after a failure
        self.recent: collections.deque = collections.deque(maxlen=cfg.prefetch + 3)
        self.error: BaseException | None = None
        self._next, self._next_draws, self._generation, self._stopped = (0, 0), (0, 0), 0, False
        self._lock = threading.Lock()
        self._ready: queue.Queue = queue.Queue(depth)
        self._thread: threading.Thread | None = None

    def jump(self, epoch: int, run: int) -> None:
        """The next run DALI asks for is `run` of `epoch`; what was prepared beyond goes."""
        with self._lock:
            self._next, self._next_draws, self._generation = (epoch, run), (epoch, run), self._generation + 1
            while not self._ready.empty():
                self._ready.get_nowait()

    def _count(self, epoch: int, run: int) -> tuple[int, int]:
        """The run after `run` of `epoch`."""
        return (epoch, run + 1) if run + 1 < self.runs else (epoch + 1, 0)

    def close(self) -> None:
        self._stopped = True

    def _prepare(self):
        """The next run's samples (or the error met), tagged with the jump they belong to."""
        with self._lock:
            generation, (epoch, run) = self._generation, self._next
            self._next = self._count(epoch, run)
        step = run * self.cfg.per_run
        try:
            if self.cache is not None:
                self.cache.advance(epoch, step)
            batch = self.reader.read(epoch, step, self.cfg.per_run)
            # DALI's tensors built here too: 0.2 ms a batch off the thread that runs DALI (measured)
            return generation, (batch, TensorListCPU([TensorCPU(a) for a in batch.jpegs], contiguous=False))
        except BaseException as e:  # noqa: BLE001 (raised from DALI's call for this run)
            return generation, e

    @staticmethod
    def _preparing(ref: weakref.ref) -> None:
        """The preparing thread: runs in order into the queue. It holds the source only while it works, so a
        loader dropped without close() takes its thread with it."""
        while (source := ref()) is not None and not source._stopped:
            prepared, ready = source._prepare(), source._ready
            del source
            while (source := ref()) is not None and not source._stopped and prepared[0] == source._generation:
                del source
                try:
                    ready.put(prepared, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def samples(self, info=None):  # info: DALI's batch_info, unused (the runs are counted here)
        if self._thread is None:
            self._thread = threading.Thread(target=Source._preparing, args=(weakref.ref(self),), daemon=True,
                                            name="samples-ahead")
            self._thread.start()
        while True:
            generation, prepared = self._ready.get()
            if generation == self._generation:
                break  # else prepared before a jump
        if isinstance(prepared, BaseException):
            self.error = prepared  # DALI raises it from pipe.run(); kept so the loader can tell it from DALI's own
            raise prepared
        self.calls += 1
        batch, jpegs = prepared
        self.recent.append(prepared)
        return jpegs, batch.labels

    def draws(self, info=None) -> tuple[np.ndarray, ...]:
        with self._lock:
            epoch, run = self._next_draws
            self._next_draws = self._count(epoch, run)
        return self._draws(epoch, run * self.cfg.per_run)

    def _draws(self, epoch: int, step: int) -> tuple[np.ndarray, ...]:
        cfg, g = self.cfg, self.split.batch
        start, count = step * g, cfg.per_run * g  # the run's global positions, sliced to this rank's
        x, y, flip, alpha = augment.counter_draws((cfg.seed, epoch), start, count, cfg.lighting_sigma,
                                                  self.span + augment.CROP)
        at = self.split.positions(step, cfg.per_run) - start
        x, y, flip, alpha = x[at], y[at], flip[at], alpha[at]
        out = [x / self.span, y / self.span, flip, self.base - alpha @ self.columns.T]
        out += [alpha] if self.alphas else []
        # DALI takes dense arrays only (a matrix product may come back in column-major order)
        return tuple(np.ascontiguousarray(a, np.int32 if a is flip else np.float32) for a in out)

    def in_flight(self) -> list[int]:
        """The shards of the runs DALI may be working on (the failed one among them)."""
        return list(dict.fromkeys(i for batch, _ in self.recent for i in batch.shards))


def _dali_draws(cfg: LoaderConfig, stats: dict, span: int, drawn: dict):
    """The draws from DALI's random operators: x, y, mirror and the per-sample mean (or a constant)."""
    offsets = [k / span for k in range(span + 1)]  # k / span is exact in float, so DALI crops at exactly k
    drawn["x"], drawn["y"] = fn.random.uniform(values=offsets), fn.random.uniform(values=offsets)
    drawn["mirror"] = fn.random.coin_flip(probability=0.5)
    if cfg.lighting_sigma == 0:
        return _base_mean(cfg, stats).tolist()
    columns, shift = _lighting_columns(cfg, stats), None
    for j in range(3):  # shift = sum_j alpha_j * column_j, per sample on the CPU (3 numbers per image)
        drawn[f"alpha{j}"] = fn.random.normal(stddev=cfg.lighting_sigma)
        term = drawn[f"alpha{j}"] * types.Constant(columns[:, j].astype(np.float32))
        shift = term if shift is None else shift + term
    return types.Constant(_base_mean(cfg, stats)) - shift


def _mean_patch(cfg: LoaderConfig, stats: dict):
    """Pixel mode: the center 224 patch of the mean image, subtracted after the fused pass; else None."""
    if cfg.mean == "channel":
        return None
    patch = augment.mean_to_subtract(stats, "pixel").astype(np.float32)
    patch = np.ascontiguousarray(patch if cfg.channels_last else patch.transpose(2, 0, 1))
    return types.Constant(patch, device="gpu" if cfg.on_gpu else "cpu")


def _normalize(cfg: LoaderConfig, image, x, y, mirror, mean, patch):
    """The fused pass: crop at integer (x, y), mirror, subtract mean (+ lighting), layout, cast. With a mean
    image `patch`, the pass writes float32, the patch is subtracted, and the result is cast once: DALI's
    arithmetic takes no float16."""
    half = cfg.dtype != "float32"
    out = fn.crop_mirror_normalize(
        image, crop=(augment.CROP, augment.CROP), crop_pos_x=x, crop_pos_y=y, mirror=mirror, mean=mean,
        std=1.0, dtype=types.FLOAT16 if half and patch is None else types.FLOAT,
        output_layout="HWC" if cfg.channels_last else "CHW", device="gpu" if cfg.on_gpu else "cpu")
    if patch is None:
        return out
    return fn.cast(out - patch, dtype=types.FLOAT16) if half else out - patch


def _decode(cfg: LoaderConfig, jpg, window=None):
    """The decoded images: whole, or (CPU decoding) only the 224x224 `window` = (x, y) anchors, as fractions
    of the span (libjpeg-turbo's ROI decoding; its rounding of the anchor is crop_mirror_normalize's)."""
    if not cfg.gpu_decoding:
        if window is None:
            image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        else:
            image = fn.decoders.image_crop(jpg, device="cpu", output_type=types.RGB,
                                           crop=(augment.CROP, augment.CROP), crop_pos_x=window[0],
                                           crop_pos_y=window[1])
        return image.gpu() if cfg.on_gpu else image  # CPU decoding feeding the GPU augmentation
    hints: dict = {"preallocate_width_hint": 256, "preallocate_height_hint": 256} if cfg.preallocate else {}
    return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=cfg.hw_decoder_load,
                             **hints)


STAGES = ("samples", "read", "decode", "all")


def _graph(cfg: LoaderConfig, train: bool, inputs, stats: dict, span: int, expose: bool, upto: str):
    """The graph after the samples: `inputs()` gives (jpg, label, drawn, mean) inside the pipeline definition
    (drawn: the host draws' nodes by name, or {} to draw with DALI's operators)."""
    jpg, label, drawn, mean = inputs()
    if upto == "samples":  # the reader alone: bytes (their sizes) and labels
        return jpg.shape(), label
    patch = _mean_patch(cfg, stats)
    if train and not drawn:
        mean = _dali_draws(cfg, stats, span, drawn)
    if upto == "read":  # the samples' sizes, not their bytes: the reader's views are not copied to an output
        return (jpg.shape(), label, mean, drawn["x"], drawn["y"], drawn["mirror"]) if train else (jpg.shape(), label)
    # the train graph may decode only its crop; the fused pass then mirrors and normalizes it whole
    window = (drawn["x"], drawn["y"]) if train and cfg.crop_decoding else None
    image = _decode(cfg, jpg, window)
    if upto == "decode":
        return image, label
    if train:
        x, y = (0.0, 0.0) if window else (drawn["x"], drawn["y"])
        out = _normalize(cfg, image, x, y, drawn["mirror"], mean, patch)
    elif cfg.tencrop:
        views = [_normalize(cfg, image, cx / span, cy / span, int(flip), mean, patch)
                 for cx, cy, flip in augment.TEN_CROPS]
        out = fn.stack(*views, axis=0)
    else:
        out = _normalize(cfg, image, 0.5, 0.5, 0, mean, patch)
    label = label.gpu() if cfg.on_gpu else label
    if expose:
        return (out, label, image) + tuple(drawn[k] for k in sorted(drawn))
    return out, label


def build_pipeline(cfg: LoaderConfig, train: bool, source: Source, stats: dict, span: int, expose: bool = False,
                   upto: str = "all", checkpoint: bytes | None = None):
    """The DALI pipeline over `source`, built, making cfg.run_size samples per run. Outputs (images, labels);
    with `expose`, also the decoded 256x256 image and the random draws, sorted by name (alpha0..2, mirror, x,
    y; with host draws alpha as one [3] vector; x and y as fractions of the 32-pixel span), so tests can replay
    them through the reference. `upto` stops early, for the benchmarks: "decode" after decoding (the decoder's
    ceiling), "read" after the samples and draws (the graph's CPU side, no image work), "samples" after the
    samples alone (the reader's bytes, as sizes, and labels). `checkpoint`: DALI's state to restore (its random
    operators', for draws="dali")."""
    if upto not in STAGES:
        raise ValueError(f"upto must be one of {STAGES}, got {upto!r}")

    def inputs():
        jpg, label = fn.external_source(source.samples, num_outputs=2, batch=True, batch_info=True, no_copy=True)
        drawn, mean = {}, None
        if source.host_draws:
            draws = fn.external_source(source.draws, num_outputs=4 + expose, batch=True, batch_info=True)
            drawn.update(x=draws[0], y=draws[1], mirror=draws[2], **({"alpha": draws[4]} if expose else {}))
            mean = draws[3]
        return jpg, label, drawn, mean if train else _base_mean(cfg, stats).tolist()

    # exec_dynamic: outputs are reference-counted rather than recycled, so the CPU loader can hand torch
    # DALI's own buffers (no copy) and they stay valid however long the caller keeps them. Checkpoints only
    # for DALI's random operators: everything else is ours to restore.
    dali_state = train and cfg.draws == "dali"

    @pipeline_def(batch_size=cfg.run_size, num_threads=cfg.threads, device_id=_device_id(cfg),
                  seed=cfg.seed * 7919 + cfg.rank, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True,
                  enable_checkpointing=dali_state, checkpoint=checkpoint if dali_state else None)
    def graph():
        return _graph(cfg, train, inputs, stats, span, expose, upto)

    pipe = graph()
    pipe.build()
    return pipe


WEBDATASET_BUFFER = 4096  # the samples DALI's reader shuffled among before this package ordered them itself


def webdataset_pipeline(loader: "Loader", locations: list, upto: str = "all"):
    """The reader this package used before it owned the order, for the benchmarks: DALI's webdataset reader
    over `locations` (the shards' paths, or their s3:// URLs for DALI's own S3 reading), shuffling as it did
    (a new shard order every epoch, a 4,096-sample buffer), feeding the same graph with the same host draws."""
    cfg = loader.cfg
    draws_of = loader._source()

    def draws(info):  # one rank's (epoch 0's), by DALI's run count
        return draws_of._draws(0, info.iteration * cfg.per_run)

    def inputs():
        jpg, label = fn.readers.webdataset(
            paths=[str(p) for p in locations], index_paths=[str(storage.with_suffix(p, ".idx")) for p in locations],
            ext=["jpg", shards.LABEL_EXT], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            random_shuffle=True, initial_fill=WEBDATASET_BUFFER, shuffle_after_epoch=True,
            shuffle_after_epoch_seed=cfg.seed, pad_last_batch=True, name="reader")
        if upto == "samples":
            return jpg, label, {}, None
        x, y, mirror, mean = fn.external_source(draws, num_outputs=4, batch=True, batch_info=True)
        return jpg, label, {"x": x, "y": y, "mirror": mirror}, mean

    @pipeline_def(batch_size=cfg.run_size, num_threads=cfg.threads, device_id=_device_id(cfg), seed=cfg.seed,
                  prefetch_queue_depth=cfg.prefetch, exec_dynamic=True)
    def graph():
        return _graph(cfg, True, inputs, loader._stats, loader._span, False, upto)

    pipe = graph()
    pipe.build()
    return pipe


def exposed_names(cfg: LoaderConfig, train: bool) -> list[str]:
    """The names of build_pipeline(..., expose=True)'s outputs, in order (the draws sorted by name)."""
    draws = ["mirror", "x", "y"]
    if cfg.draws == "host":
        draws = ["alpha"] + draws
    elif cfg.lighting_sigma > 0:
        draws = ["alpha0", "alpha1", "alpha2"] + draws
    return ["out", "label", "image"] + (draws if train else [])


def _device_id(cfg: LoaderConfig) -> int | None:
    if not cfg.on_gpu:
        return None
    return int(cfg.device.split(":")[1]) if ":" in cfg.device else torch.cuda.current_device()


def _gather(cfg: LoaderConfig):
    """torch.distributed's all_gather_object when this loader is one rank of an initialised process group of
    its world size (alexnet-train, alexnet-eval), else None: the ranks then share the shards' hashing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != cfg.world_size or \
            dist.get_rank() != cfg.rank:
        return None

    def gather(obj):
        out = [None] * cfg.world_size
        dist.all_gather_object(out, obj)
        return out
    return gather


# ---- bit rot ------------------------------------------------------------------------------------------

def _damage(path: Path, info: shards.ShardInfo, kept: bool) -> str | None:
    """The message for a shard whose bytes differ from the manifest, or None; `kept`: its size and time did
    not change (bit rot, or a bad copy)."""
    try:
        if shards.file_sha256(path) == info.sha256:
            return None
    except FileNotFoundError:
        return None  # a cached copy evicted meanwhile: it is checked again when fetched
    how = " while its size and time did not change (bit rot, or a bad copy" if kept else " (damaged"
    return (f"{path}: its bytes differ from {shards.MANIFEST} (sha256){how}{shards.undecodable(path)}): copy it "
            "again, or run alexnet-prep --rebuild over the source; alexnet-prep --verify names every damaged shard")


class _Digest:
    """A background check of the shards this rank reads in its first epoch against the manifest's sha256,
    once per loader (once per run), in the order it reads them: bit rot keeps a shard's size and time, which
    is all a loader start compares (the stat cache, or a cached copy's record). So the shards are mostly
    hashed while they are in the page cache; sha256 runs outside the GIL at about 1.7 GB/s per core here."""

    def __init__(self, paths: list[Path], entries: list[shards.ShardInfo], order: list[int],
                 cache: NodeCache | None = None):
        self.paths, self.entries, self.cache = paths, entries, cache
        self.problem: str | None = None
        self.intact: set[int] = set()
        self.thread = threading.Thread(target=self._run, args=(order,), daemon=True, name="shard-digest")
        self.thread.start()

    def _run(self, order: list[int]) -> None:
        for i in order:
            self.problem = self.damage(i, kept=True)
            if self.problem:
                return
            self.intact.add(i)

    def damage(self, i: int, kept: bool) -> str | None:
        """The message for shard i if its bytes are not the manifest's (a node cache's copy is removed)."""
        problem = _damage(self.paths[i], self.entries[i], kept)
        return self.cache.damaged(i) if problem and self.cache is not None else problem

    def check(self, wait: bool = False) -> None:
        """Raise the ShardError of a damaged shard, if one was found (with `wait`, once every shard is read)."""
        if wait:
            self.thread.join()
        if self.problem:
            raise ShardError(self.problem)


# ---- where the shards are -----------------------------------------------------------------------------

def _open_split(cfg: LoaderConfig, samples: int | None):
    """(manifest, the split's first shards holding `samples` (all for None), their local files, the node cache
    for a store or None, the shards the background digest should hash), after the checks that turn what
    would hang or crash a reader into one line."""
    split = cfg.split_name
    if not storage.is_url(cfg.shards):
        paths, _, manifest = verified.readable_split(Path(cfg.shards), split, rank=cfg.rank, world_size=cfg.world_size,
                                                   gather=_gather(cfg), samples=samples)
        entries = manifest.splits[split].shards[:len(paths)]
        return manifest, entries, paths, None
    storage.configure(cfg.storage_timeout)
    store = storage.store(str(cfg.shards))
    manifest = shards.load_manifest(cfg.shards)
    if split not in manifest.splits:
        raise ShardError(f"{storage.join(cfg.shards, shards.MANIFEST)}: no split {split!r} (has "
                         f"{sorted(manifest.splits)})")
    entries = manifest.splits[split].shards
    entries = entries[:shards.first_shards(entries, samples)]
    root = directory(cfg.cache_dir or storage.default_cache_root() / "shards", store.url)
    return manifest, entries, [root / split / e.name for e in entries], root


def _in_flight(cfg: LoaderConfig) -> int:
    """DALI runs a loader has in flight: those DALI made ahead, the one in use, the source's prepared ones."""
    return cfg.prefetch + 1 + PREPARED


def _lag(cfg: LoaderConfig) -> int:
    """The node cache's margin per batch of a run: the runs by which another rank of the node may lag (those
    in flight); a rank alone on its node needs only the run it reads (the views handed to DALI keep their
    shard's map after an eviction). On 2 cores, with a quarter of the split as budget, the margin of the runs in
    flight left room only for runs of one batch (0.72x the local loader)."""
    return _in_flight(cfg) if len(node_ranks(cfg.rank, cfg.world_size)) > 1 else 1


class Loader:
    """Iterable of (images, labels) torch tensors on the loader's device; len() is batches per epoch.

    One Loader serves every epoch (its DALI pipeline, threads and decoder state are built once). Every rank
    yields the same number of batches. `state`: a state_dict() to continue from (saved on any number of ranks
    with the same global batch); `first_epoch`: the epoch a fresh loader starts in; `samples`: read only the
    split's first shards holding that many samples; `digest`: check this rank's shards in the background
    (off for a benchmark's further loaders over the same shards). Padding positions (the last step's, past
    the split's end) carry label PAD_LABEL, so losses with ignore_index=-100 and metrics that skip negative
    labels count each sample exactly once. `close()` (or the loader's end) stops the node cache's threads.
    """

    def __init__(self, cfg: LoaderConfig, train: bool, state: dict | None = None, first_epoch: int = 0,
                 samples: int | None = None, digest: bool = True):
        if train and cfg.tencrop:
            raise OptionError("option tencrop: ten crops are for evaluation (eval_loader), not training")
        manifest, entries, paths, cache_root = _open_split(cfg, samples)
        self.classes, self.n_samples = manifest.classes, sum(e.samples for e in entries)
        order = Order(tuple(e.samples for e in entries), cfg.seed, shuffle=train and cfg.shard_shuffle,
                      window=cfg.shuffle_window if train else 1, streams=cfg.streams)
        self.split = Split(order, cfg.batch_size * cfg.world_size, cfg.rank, cfg.world_size)
        given = cfg.batches_per_run is not None
        cfg = self.cfg = cfg.runs_for(self.split.steps)  # per_run set from here on
        self.train = train
        self.epoch, self._position, dali = first_epoch, 0, None
        if state is not None:
            self.epoch, self._position, dali = self._restore(state)
        self.cache: NodeCache | None = None
        if cache_root is not None:
            lag = _lag(cfg)
            margins = [lag * k for k in ([cfg.per_run] if given else range(cfg.per_run, 0, -1))]
            self.cache = NodeCache(storage.store(str(cfg.shards)), cfg.split_name, entries, cache_root, self.split,
                                   budget=cfg.cache_bytes, read_ahead=cfg.read_ahead, first_epoch=self.epoch,
                                   margin=margins[0], fallback_margins=tuple(margins[1:]))
            # a bounded cache holds the shards of the runs in flight: the default runs shrink until it can
            cfg = self.cfg = dataclasses.replace(cfg, batches_per_run=self.cache.margin // lag)
            weakref.finalize(self, self.cache.close)
        self._entries, self._paths = entries, paths
        self._stats = shards.load_stats(cfg.shards)
        self._span = manifest.image_size - augment.CROP  # crop_pos is normalised: offset = pos * span
        self.source = self._source()
        weakref.finalize(self, self.source.close)
        self.batches, self.runs = self.split.steps, self.source.runs
        self.pipe = build_pipeline(cfg, train, self.source, self._stats, self._span, checkpoint=dali)
        # bit rot is named during the first epoch: each batch looks, and the epoch's end waits for the check
        hashed = set(range(len(entries))) if self.cache is None else self.cache.trusted
        first = [i for i in self.split.uses(self.epoch) if i in hashed] if digest else []
        self._digest = _Digest(paths, entries, first, self.cache)
        self._resuming = state is not None
        self._taken = 0  # runs returned by DALI
        # DALI's state before the run being sliced (batches_per_run > 1, DALI's draws); a loader restored inside
        # a run starts in that state
        self._before_run = dali
        self._torch_device = torch.device(cfg.device if cfg.on_gpu else "cpu")
        self._stream_ordered = cfg.stream_ordered and cfg.on_gpu

    def _source(self, alphas: bool = False, draws: bool = True) -> Source:
        """A source of this loader's samples (and host draws, unless the graph needs none), starting at its
        current epoch and step."""
        need = self.cache.need if self.cache is not None else self._paths.__getitem__
        host_draws = self.train and self.cfg.draws == "host" and draws
        source = Source(self.cfg, self.split, SampleReader(self.split, self._entries, need), self._stats, self._span,
                        host_draws=host_draws, alphas=alphas, cache=self.cache)
        source.jump(self.epoch, self._position // self.cfg.per_run)
        return source

    def graph(self, expose: bool = False, upto: str = "all"):
        """Another DALI pipeline over this loader's samples from where it stands: with `expose`, the decoded
        images and the draws as outputs too (tests replay them through the reference); with `upto`, stopped
        early (the benchmarks' stages). See build_pipeline."""
        # decoding alone needs no draws (unless of a window), nor the samples alone
        draws = upto in ("read", "all") or upto == "decode" and self.cfg.crop_decoding
        return build_pipeline(self.cfg, self.train, self._source(alphas=expose, draws=draws), self._stats,
                              self._span, expose, upto)

    def _restore(self, state: dict) -> tuple[int, int, bytes | None]:
        """(epoch, batches of it taken, DALI's state or None) of a saved state, checked against this loader."""
        if int(state.get("global_batch", -1)) != self.split.batch:
            raise OptionError(f"the loader state was saved with a global batch of {state.get('global_batch')} "
                              f"(batch x ranks); this loader's is {self.split.batch} ({self.cfg.batch_size} x "
                              f"{self.cfg.world_size}): resume with the same global batch")
        dali = None
        if "dali" in state and int(state["world_size"]) == self.cfg.world_size:
            dali = state["dali"].numpy().tobytes()  # DALI's draws continue only on as many ranks as drew them
        return int(state["epoch"]), int(state["step"]), dali

    def __len__(self) -> int:
        return self.batches

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    def state_dict(self) -> dict:
        """Where the data stream is: the epoch and the global steps of it already taken (the same on every
        rank), the global batch, and with DALI's draws DALI's state (a uint8 tensor). `Loader(cfg, train,
        state)` continues with exactly the next batch, on this number of ranks or another. In the middle of a
        run of several batches, DALI's state before that run: the restored loader makes the run again and
        skips the batches already taken."""
        epoch, position = self.epoch, self._position
        if position == self.batches:
            epoch, position = epoch + 1, 0
        state: dict = {"epoch": epoch, "step": position, "global_batch": self.split.batch,
                       "world_size": self.cfg.world_size}
        if self.train and self.cfg.draws == "dali":
            dali = self._before_run if position % self.cfg.per_run else self.pipe.checkpoint()
            assert dali is not None  # mid-run, _next_run kept the state before the run
            state["dali"] = torch.frombuffer(bytearray(dali), dtype=torch.uint8)
        return state

    def _to_torch(self, tensor_list):
        t = tensor_list.as_tensor()
        if not self.cfg.on_gpu:
            # zero-copy: on 2 cores a copy of every batch costs ~40% of throughput (measured)
            return torch.from_dlpack(t)
        dtype = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64}[t.dtype]
        out = torch.empty(t.shape(), dtype=dtype, device=self._torch_device)
        # a device-to-device copy ordered on torch's current stream: no host round trip, no sync
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self._torch_device))
        return out

    def _run(self):
        """DALI's next run, its failures named: our source's own error (a store gone, a changed object), or a
        damaged shard among those the runs in flight read."""
        try:
            outs = self.pipe.run(torch.cuda.current_stream(self._torch_device)) if self._stream_ordered \
                else self.pipe.run()
        except Exception:
            if self.source.error is not None:
                raise self.source.error from None
            problem = self._find_damage()
            if problem:
                raise ShardError(problem) from None
            raise
        self._taken += 1
        return outs

    def _next_run(self):
        """One DALI run as torch tensors (images, labels)."""
        if self.cfg.per_run > 1 and self.train and self.cfg.draws == "dali":
            self._before_run = self.pipe.checkpoint()
        outs = self._run()
        return self._to_torch(outs[0]), self._to_torch(outs[1]).view(-1)

    def _find_damage(self) -> str | None:
        """After a DALI failure: a damaged shard among those of the runs in flight (those the digest found
        intact skipped), hashing for at most DAMAGE_SEARCH_SECONDS; None if none was found."""
        deadline = time.monotonic() + DAMAGE_SEARCH_SECONDS
        self._digest.thread.join(timeout=DAMAGE_SEARCH_SECONDS)
        if self._digest.problem:
            return self._digest.problem
        for i in self.source.in_flight():
            if time.monotonic() > deadline:
                break
            if i not in self._digest.intact:
                problem = self._digest.damage(i, kept=False)
                if problem:
                    return problem
        return None

    def _finish_abandoned_epoch(self) -> None:
        """An epoch left part-way (a `break`): the source jumps to the next epoch, and the runs DALI made ahead
        in the abandoned one are dropped. (Left after its last batch, the epoch is simply over: the source
        went on into the next one in order.)"""
        if self._position < self.batches:
            self.source.jump(self.epoch + 1, 0)
            for _ in range(self.source.calls - self._taken):
                self._run()
        self.epoch, self._position = self.epoch + 1, 0

    def __iter__(self):
        if self._position and not self._resuming:
            self._finish_abandoned_epoch()
        per_run, size = self.cfg.per_run, self.cfg.batch_size
        # a resumed loader continues its epoch, inside a run of several batches if it stopped in one
        held = self._next_run() if self._resuming and self._position % per_run else None
        self._resuming = False
        for b in range(self._position, self.batches):
            if b % per_run == 0:
                held = self._next_run()
            part = slice(b % per_run * size, (b % per_run + 1) * size)
            images, labels = held[0][part], held[1][part]
            self._position = b + 1
            if self.cfg.channels_last:
                dims = (0, 1, 4, 2, 3) if images.dim() == 5 else (0, 3, 1, 2)
                images = images.permute(*dims)  # a channels_last view of NCHW, no copy
            if self.cfg.dtype == "bfloat16":
                # DALI has no bfloat16: it writes float16 (finer than bfloat16 for these values, at
                # half float32's bytes) and one cast kernel on the GPU makes it bfloat16
                images = images.to(torch.bfloat16)
            self._digest.check()
            yield images, labels
        self._digest.check(wait=True)
        self.epoch, self._position = self.epoch + 1, 0

    def wait_for_digest(self) -> "Loader":
        """Wait for the background digest of the shards; ShardError if one is damaged. The benchmarks call this
        before timing, so that the one-time digest does not take a core from what they measure."""
        self._digest.check(wait=True)
        return self

    def endless(self):
        """Batches epoch after epoch from this one loader (its pipeline is never rebuilt)."""
        while True:
            yield from self

    def close(self) -> None:
        """Stop preparing samples and the node cache's fetching (the loader's end does it too)."""
        self.source.close()
        if self.cache is not None:
            self.cache.close()


def _loader_options(scope: str) -> list[dataclasses.Field]:
    """The LoaderConfig options a loader of `scope` ("train" or "eval") takes: its own first, then the shared."""
    own = LoaderConfig.__annotations__
    fields = [f for f in documented_fields(LoaderConfig) if f.name != "shards" and f.metadata["scope"] in (None, scope)]
    return sorted(fields, key=lambda f: f.name not in own)


def _make_loader(scope: str, shards_dir, options: dict) -> Loader:
    known = {f.name for f in _loader_options(scope)}
    for name in options:
        if name not in known:
            other = "eval" if scope == "train" else "train"
            if name in {f.name for f in _loader_options(other)}:
                where = f"{'an' if other == 'eval' else 'a'} {other}_loader option"
            else:
                where = "not an option"
            raise OptionError(f"{scope}_loader: {name!r} is {where} (options: {', '.join(sorted(known))})")
    split = options.pop("split", None) or ("train" if scope == "train" else "val")
    return Loader(LoaderConfig(shards=shards_dir, split=split, **options), train=scope == "train")


def train_loader(shards_dir, **options) -> Loader:
    """The paper's training augmentation over SHARDS/train (a directory, or a URL such as s3://bucket/prefix):
    random 224 crops, flips, mean subtraction and PCA lighting; an iterable of (images, labels) batches,
    labels PAD_LABEL (-100) where the last step is padded."""
    return _make_loader("train", shards_dir, options)


def eval_loader(shards_dir, **options) -> Loader:
    """Center crops (or the paper's ten crops with tencrop=True) over SHARDS/val (a directory or a URL), every
    image once over all ranks; an iterable of (images, labels) batches, labels PAD_LABEL (-100) where the last
    step is padded."""
    return _make_loader("eval", shards_dir, options)


def _document(loader, scope: str) -> None:
    """Give `loader` the signature and docstring of its options, as declared on LoaderConfig, so that help()
    and editors show them."""
    hints = typing.get_type_hints(LoaderConfig)
    params = [inspect.Parameter("shards_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path | str)]
    lines = []
    for f in _loader_options(scope):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=hints[f.name]))
        lines.append(f"    {f.name} (default {f.default!r}): {f.metadata['help']}")
    loader.__signature__ = inspect.Signature(params, return_annotation=Loader)
    loader.__doc__ += "\n\n    Options:\n" + "\n".join(lines) + "\n"


_document(train_loader, "train")
_document(eval_loader, "eval")
