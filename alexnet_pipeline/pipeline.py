"""The DALI pipelines (the only module that imports DALI) and the torch loaders around them.

Train: read shards (sharded across ranks; the shards in a new order every epoch, the samples mixed in a
buffer; prep shuffled them globally once), decode (nvJPEG via ``mixed`` on a GPU, or libjpeg-turbo on CPU
threads), then a single fused ``crop_mirror_normalize`` pass does crop, flip, mean subtraction, lighting,
layout and cast: the lighting shift is a per-image constant per channel, so it folds into a per-sample mean
(docs/design.md). The per-image draws come from one external source that computes the whole batch's crops,
flips and per-sample means at once from a counter-based generator (``draws="host"``), or from DALI's random
operators (``draws="dali"``). One switch, ``device``, picks where the augmentation runs.

Eval: the center crop, or the ten crops stacked as [10, 3, 224, 224] per image. Across ranks every image is
seen exactly once: DALI pads each rank's shard to the same number of batches by repeating its last sample,
and the loader marks those repeats with label PAD_LABEL (-100, torch's default ignore_index).

A DALI run may hold several batches (``batches_per_run``): the loader slices it into batches in order, so
the batches, their padding marks and the data position are the same as with one batch per run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import tempfile
import threading
import time
import typing
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from . import augment, shards
from .config import OptionError, documented_fields
from .options import LoaderConfig, batches_per_epoch, rank_part, rank_samples, runs_per_epoch
from .shards import ShardError  # noqa: F401 (the loaders' errors; shards.py owns the format)

PAD_LABEL = -100
DAMAGE_SEARCH_SECONDS = 120  # after a DALI failure, how long this rank may hash its shards to name a damaged one


def _base_mean(cfg: LoaderConfig, stats: dict) -> np.ndarray:
    """What crop_mirror_normalize subtracts before lighting: mean_rgb (channel mode) or nothing (pixel mode,
    whose mean image is subtracted after the pass)."""
    return (stats["mean_rgb"] if cfg.mean == "channel" else np.zeros(3)).astype(np.float32)


def _lighting_columns(cfg: LoaderConfig, stats: dict) -> np.ndarray:
    """shift = columns @ alpha: the eigenvectors scaled by the lighting form's per-axis magnitude."""
    return stats["eigvec"] * augment.lighting_scale(stats["eigval"], cfg.lighting_form)


class _HostDraws:
    """The external source of the train graph: for a DALI run, every sample's crop offsets (as fractions of
    the span), flip and per-sample mean (base mean minus the lighting shift), from augment.counter_draws
    keyed on (seed, rank, epoch) and the sample's position in its epoch. DALI calls it with the run's
    iteration, which its checkpoints restore, so a resumed pipeline draws exactly what it would have."""

    def __init__(self, cfg: LoaderConfig, stats: dict, runs: int, span: int, first_epoch: int, alphas: bool):
        self.cfg, self.runs, self.span, self.first_epoch, self.alphas = cfg, runs, span, first_epoch, alphas
        self.base, self.columns = _base_mean(cfg, stats), _lighting_columns(cfg, stats).astype(np.float64)

    def __call__(self, info):
        cfg = self.cfg
        epoch, run = self.first_epoch + info.iteration // self.runs, info.iteration % self.runs
        x, y, flip, alpha = augment.counter_draws((cfg.seed, cfg.rank, epoch), run * cfg.run_size, cfg.run_size,
                                                  cfg.lighting_sigma, self.span + augment.CROP)
        out = (x / self.span, y / self.span, flip, self.base - alpha @ self.columns.T)
        out += (alpha,) if self.alphas else ()
        # DALI takes dense arrays only (a matrix product may come back in column-major order)
        return tuple(np.ascontiguousarray(a, np.int32 if a is flip else np.float32) for a in out)


def _draws(cfg: LoaderConfig, stats: dict, n_samples: int, span: int, first_epoch: int, expose: bool, drawn: dict):
    """The train graph's random choices: x, y and mirror into `drawn` (with `expose`, the alphas too), and the
    per-sample mean (base mean minus the lighting shift) returned, from the host draws or DALI's operators."""
    if cfg.draws == "host":
        source = _HostDraws(cfg, stats, runs_per_epoch(cfg, n_samples), span, first_epoch, alphas=expose)
        x, y, mirror, mean, *alpha = fn.external_source(source, num_outputs=4 + expose, batch=True, batch_info=True)
        drawn.update(x=x, y=y, mirror=mirror, **({"alpha": alpha[0]} if expose else {}))
        return mean
    return _dali_draws(cfg, stats, span, drawn)


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


STAGES = ("read", "decode", "all")


def build_pipeline(cfg: LoaderConfig, train: bool, expose: bool = False, upto: str = "all",
                   checkpoint: str | None = None, first_epoch: int = 0, samples: int | None = None):
    """The DALI pipeline, built, making cfg.run_size samples per run. Outputs (images, labels); with
    `expose`, also the decoded 256x256 image and the random draws, sorted by name (alpha0..2, mirror, x, y;
    with host draws alpha as one [3] vector; x and y as fractions of the 32-pixel span), so tests can replay
    them through the reference. `upto` stops early, for the benchmarks: "decode" after decoding, as the graph
    decodes (the decoder's ceiling), "read" after reading and the random draws (the graph's CPU side, no image work).
    `first_epoch`: the epoch a fresh (not restored) pipeline starts in, which keys the host draws. `samples`:
    read only the split's first shards holding that many samples (the figures use the first 10,000)."""
    if upto not in STAGES:
        raise ValueError(f"upto must be one of {STAGES}, got {upto!r}")
    paths, n_samples, manifest = shards.readable_split(cfg.shards, cfg.split_name, rank=cfg.rank,
                                                       world_size=cfg.world_size, gather=_gather(cfg),
                                                       samples=samples)
    stats = shards.load_stats(cfg.shards)
    span = manifest.image_size - augment.CROP  # crop_pos is normalised: offset = pos * span

    # a new shard order every epoch, the same on every rank (one seed), so the ranks' parts stay disjoint
    shard_order = {}
    if train and cfg.shard_shuffle:
        shard_order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": cfg.seed}

    # exec_dynamic: outputs are reference-counted rather than recycled, so the CPU loader can hand torch
    # DALI's own buffers (no copy) and they stay valid however long the caller keeps them.
    @pipeline_def(batch_size=cfg.run_size, num_threads=cfg.threads, device_id=_device_id(cfg),
                  seed=cfg.seed * 7919 + cfg.rank, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True,
                  enable_checkpointing=True, checkpoint=checkpoint)
    def graph():
        jpg, label = fn.readers.webdataset(
            paths=[str(p) for p in paths], index_paths=[str(p.with_suffix(".idx")) for p in paths],
            ext=["jpg", shards.LABEL_EXT], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            shard_id=cfg.rank, num_shards=cfg.world_size, pad_last_batch=True, random_shuffle=train,
            initial_fill=max(1, min(cfg.shuffle_buffer, n_samples)), name="reader", **shard_order)
        drawn, patch = {}, _mean_patch(cfg, stats)
        mean = _draws(cfg, stats, n_samples, span, first_epoch, expose, drawn) if train else \
            _base_mean(cfg, stats).tolist()
        if upto == "read":
            return (jpg, label, mean, drawn["x"], drawn["y"], drawn["mirror"]) if train else (jpg, label)
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

    pipe = graph()
    try:
        pipe.build()
    except RuntimeError as e:
        raise ShardError(f"{cfg.shards / cfg.split_name}: DALI could not open the shards: {e}") from None
    return pipe, n_samples, manifest


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


@functools.lru_cache(maxsize=16)
def _dali_shard_order(n_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order in which DALI's webdataset reader with shuffle_after_epoch (seed `seed`) takes `n_shards` shards
    in `epoch`, read off DALI itself: a probe of one-sample shards (one small tar, an index per shard) run
    for epoch + 1 epochs. DALI documents no formula, so it is asked."""
    with tempfile.TemporaryDirectory(prefix="alexnet-order-") as tmp:
        tar = Path(tmp) / "probe.tar"
        members = [shards.tar_member(f"{i}.lbl", i.to_bytes(8, "little")) for i in range(n_shards)]
        tar.write_bytes(b"".join(members) + b"\0" * 1024)
        index = []
        for i, at in enumerate(sum((len(m) for m in members[:i]), 0) for i in range(n_shards)):
            index.append(Path(tmp) / f"{i}.idx")
            index[-1].write_text(f"v1.2 1\nlbl {at + 512} 8 {i}.lbl\n")

        @pipeline_def(batch_size=n_shards, num_threads=1, device_id=None)
        def probe():
            return fn.readers.webdataset(paths=[str(tar)] * n_shards, index_paths=[str(p) for p in index], ext=["lbl"],
                                         dtypes=[types.INT64], random_shuffle=False, shuffle_after_epoch=True,
                                         shuffle_after_epoch_seed=seed)

        pipe = probe()
        pipe.build()
        for _ in range(epoch + 1):
            labels = pipe.run()[0]
        order = tuple(int(np.array(labels[i])[0]) for i in range(n_shards))
        del labels, pipe  # before its files go
        return order


def read_order(cfg: LoaderConfig, counts: list[int], epoch: int, shard_shuffled: bool) -> list[int]:
    """The shards (indices into the split's, whose sample counts are `counts`) this rank reads in `epoch`, in
    the order it reads them: its part of the split (options.rank_part) in DALI's shard order for the epoch."""
    order = _dali_shard_order(len(counts), cfg.seed, epoch) if shard_shuffled else range(len(counts))
    n, part = sum(counts), rank_part(cfg, epoch, shard_shuffled)
    lo, hi = n * part // cfg.world_size, n * (part + 1) // cfg.world_size
    mine, at = [], 0
    for i in order:
        if at < hi and at + counts[i] > lo:
            mine.append(i)
        at += counts[i]
    return mine


def _damage(path: Path, info: shards.ShardInfo, kept: bool) -> str | None:
    """The message for a shard whose bytes differ from the manifest, or None; `kept`: its size and time did
    not change (bit rot, or a bad copy)."""
    if shards.file_sha256(path) == info.sha256:
        return None
    how = " while its size and time did not change (bit rot, or a bad copy" if kept else " (damaged"
    return (f"{path}: its bytes differ from {shards.MANIFEST} (sha256){how}{shards.undecodable(path)}): copy it "
            "again, or run alexnet-prep --rebuild over the source; alexnet-prep --verify names every damaged shard")


class _Digest:
    """A background check of the shards this rank reads in its first epoch against the manifest's sha256,
    once per loader (once per run), in the order it reads them: bit rot keeps a shard's size and time, which
    is all a loader start compares (the stat cache). The shards are hashed in the order DALI reads them, so
    mostly while they are in the page cache; sha256 runs outside the GIL at about 1.7 GB/s per core here."""

    def __init__(self, paths: list[Path], entries: list[shards.ShardInfo], order: list[int]):
        self.paths, self.entries = paths, entries
        self.problem: str | None = None
        self.intact: set[int] = set()
        self.thread = threading.Thread(target=self._run, args=(order,), daemon=True, name="shard-digest")
        self.thread.start()

    def _run(self, order: list[int]) -> None:
        for i in order:
            self.problem = _damage(self.paths[i], self.entries[i], kept=True)
            if self.problem:
                return
            self.intact.add(i)

    def check(self, wait: bool = False) -> None:
        """Raise the ShardError of a damaged shard, if one was found (with `wait`, once every shard is read)."""
        if wait:
            self.thread.join()
        if self.problem:
            raise ShardError(self.problem)


class Loader:
    """Iterable of (images, labels) torch tensors on the loader's device; len() is batches per epoch.

    One Loader serves every epoch (its DALI pipeline, threads and decoder state are built once). Every rank
    yields the same number of batches. `state`: a state_dict() to continue from; `first_epoch`: the epoch a
    fresh loader starts in; `samples`: read only the split's first shards holding that many samples;
    `digest`: check this rank's shards in the background (off for a benchmark's further loaders over the
    same shards). Positions past the end of this rank's part of the epoch (DALI's
    padding) carry label PAD_LABEL, so losses with ignore_index=-100 and metrics that skip negative labels
    count each sample exactly once.
    """

    def __init__(self, cfg: LoaderConfig, train: bool, state: dict | None = None, first_epoch: int = 0,
                 samples: int | None = None, digest: bool = True):
        if train and cfg.tencrop:
            raise OptionError("option tencrop: ten crops are for evaluation (eval_loader), not training")
        self.cfg, self.train = cfg, train
        self.shard_shuffled = train and cfg.shard_shuffle  # DALI's shuffle_after_epoch: parts stay, order changes
        checkpoint = None if state is None else state["dali"].numpy().tobytes()
        # the epoch the pipeline's first run belongs to; a restored pipeline counts its runs from there too
        self.first_epoch = first_epoch if state is None else int(state["first_epoch"])
        self.pipe, self.n_samples, manifest = build_pipeline(cfg, train, checkpoint=checkpoint,
                                                             first_epoch=self.first_epoch, samples=samples)
        self.epoch = self.first_epoch if state is None else int(state["epoch"])
        entries = manifest.splits[cfg.split_name].shards
        keep = shards.first_shards(entries, samples)  # the shards build_pipeline read
        self._paths, self._entries = shards.shard_paths(cfg.shards, cfg.split_name, manifest)[:keep], entries[:keep]
        # bit rot is named during the first epoch: each batch looks, and the epoch's end waits for the check
        self._digest = _Digest(self._paths, self._entries, self._read_order(self.epoch) if digest else [])
        self.classes = manifest.classes
        self.batches = batches_per_epoch(cfg, self.n_samples)
        self.runs = runs_per_epoch(cfg, self.n_samples)
        self._position = 0 if state is None else int(state["position"])  # batches of `epoch` yielded
        self._resuming = state is not None
        # DALI's state before the run being sliced (batches_per_run > 1); a loader restored inside a run starts
        # in that state
        self._before_run = checkpoint
        self._torch_device = torch.device(cfg.device if cfg.on_gpu else "cpu")
        self._stream_ordered = cfg.stream_ordered and cfg.on_gpu

    def __len__(self) -> int:
        return self.batches

    def _read_order(self, epoch: int) -> list[int]:
        """The shards this rank reads in `epoch` (DALI counts epochs from its pipeline's first)."""
        return read_order(self.cfg, [e.samples for e in self._entries], epoch - self.first_epoch,
                          self.shard_shuffled)

    def _find_damage(self) -> str | None:
        """After a DALI failure: a damaged shard among those this rank reads this epoch and the next, in that
        order (those the digest found intact skipped), hashing for at most DAMAGE_SEARCH_SECONDS; None if none
        was found."""
        seconds = DAMAGE_SEARCH_SECONDS
        deadline = time.monotonic() + seconds
        self._digest.thread.join(timeout=seconds)
        if self._digest.problem:
            return self._digest.problem
        for i in dict.fromkeys(self._read_order(self.epoch) + self._read_order(self.epoch + 1)):
            if time.monotonic() > deadline:
                break
            if i not in self._digest.intact:
                problem = _damage(self._paths[i], self._entries[i], kept=False)
                if problem:
                    return problem
        return None

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    def state_dict(self) -> dict:
        """Where the data stream is: DALI's reader and random-generator states (a uint8 tensor), the epoch and
        the batches of it already taken. `Loader(cfg, train, state)` continues with exactly the next batch.
        In the middle of a run of several batches, DALI's state before that run: the restored loader makes
        the run again and skips the batches already taken."""
        epoch, position = self.epoch, self._position
        if position == self.batches:
            epoch, position = epoch + 1, 0
        mid_run = position % self.cfg.batches_per_run
        dali = self._before_run if mid_run else self.pipe.checkpoint()
        assert dali is not None  # mid-run, _next_run kept the state before the run
        return {"dali": torch.frombuffer(bytearray(dali), dtype=torch.uint8), "epoch": epoch, "position": position,
                "first_epoch": self.first_epoch}

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

    def _next_run(self):
        """One DALI run as torch tensors (images, labels)."""
        if self.cfg.batches_per_run > 1:
            self._before_run = self.pipe.checkpoint()
        try:
            outs = self.pipe.run(torch.cuda.current_stream(self._torch_device)) if self._stream_ordered \
                else self.pipe.run()
        except RuntimeError:
            # DALI names no file; a shard of this rank whose bytes changed since prep wrote it is the likely culprit
            problem = self._find_damage()
            if problem:
                raise ShardError(problem) from None
            raise
        return self._to_torch(outs[0]), self._to_torch(outs[1]).view(-1)

    def _finish_abandoned_epoch(self) -> None:
        """An epoch abandoned part-way (a `break`) leaves DALI's reader mid-epoch; its remaining runs are made
        and dropped, so that epochs, shard rotation and padding marks stay aligned."""
        taken = -(-self._position // self.cfg.batches_per_run)
        for _ in range(taken, self.runs):
            self._next_run()
        self.epoch, self._position = self.epoch + 1, 0

    def __iter__(self):
        if self._position and not self._resuming:
            self._finish_abandoned_epoch()
        per_run, size = self.cfg.batches_per_run, self.cfg.batch_size
        # a resumed loader continues its epoch, inside a run of several batches if it stopped in one
        held = self._next_run() if self._resuming and self._position % per_run else None
        self._resuming = False
        valid = rank_samples(self.cfg, self.n_samples, self.epoch - self.first_epoch, self.shard_shuffled)
        for b in range(self._position, self.batches):
            if b % per_run == 0:
                held = self._next_run()
            part = slice(b % per_run * size, (b % per_run + 1) * size)
            images, labels = held[0][part], held[1][part]
            self._position = b + 1
            n_valid = min(max(valid - b * size, 0), size)
            if n_valid < size:
                labels[n_valid:] = PAD_LABEL
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

    def verified(self) -> "Loader":
        """Wait for the background digest of the shards; ShardError if one is damaged. The benchmarks call this
        before timing, so that the one-time digest does not take a core from what they measure."""
        self._digest.check(wait=True)
        return self

    def endless(self):
        """Batches epoch after epoch from this one loader (its pipeline is never rebuilt)."""
        while True:
            yield from self


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
    """The paper's training augmentation over SHARDS/train: random 224 crops, flips, mean subtraction and PCA
    lighting; an iterable of (images, labels) batches, labels PAD_LABEL (-100) where DALI pads."""
    return _make_loader("train", shards_dir, options)


def eval_loader(shards_dir, **options) -> Loader:
    """Center crops (or the paper's ten crops with tencrop=True) over SHARDS/val, every image once over all
    ranks; an iterable of (images, labels) batches, labels PAD_LABEL (-100) where DALI pads."""
    return _make_loader("eval", shards_dir, options)


def _document(loader, scope: str) -> None:
    """Give `loader` the signature and docstring of its options, as declared on LoaderConfig, so that help()
    and editors show them."""
    hints = typing.get_type_hints(LoaderConfig)
    params = [inspect.Parameter("shards_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path)]
    lines = []
    for f in _loader_options(scope):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=hints[f.name]))
        lines.append(f"    {f.name} (default {f.default!r}): {f.metadata['help']}")
    loader.__signature__ = inspect.Signature(params, return_annotation=Loader)
    loader.__doc__ += "\n\n    Options:\n" + "\n".join(lines) + "\n"


_document(train_loader, "train")
_document(eval_loader, "eval")
