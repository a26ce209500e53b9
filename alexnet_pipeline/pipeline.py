"""The DALI pipelines (the only module that imports DALI) and the torch loaders around them.

Train: read shards (sharded across ranks; the shards in a new order every epoch, the samples mixed in a
buffer; prep shuffled them globally once), decode (nvJPEG via ``mixed`` on a GPU, or libjpeg-turbo on CPU
threads), then a single fused ``crop_mirror_normalize`` pass does crop, flip, mean subtraction, lighting,
layout and cast: the lighting shift is a per-image constant per channel, so it folds into a per-sample mean
(docs/design.md). One switch, ``device``, picks where the augmentation runs; the graph is otherwise the same.

Eval: the center crop, or the ten crops stacked as [10, 3, 224, 224] per image. Across ranks every image is
seen exactly once: DALI pads each rank's shard to the same number of batches by repeating its last sample,
and the loader marks those repeats with label PAD_LABEL (-100, torch's default ignore_index).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from . import augment, shards
from .config import OptionError, check, documented_fields, option
from .shards import ShardError  # noqa: F401 (the loaders' errors; shards.py owns the format)

PAD_LABEL = -100
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(kw_only=True)
class Augmentation:
    """The paper's augmentation and normalisation (shared by the loaders and alexnet-train)."""

    mean: str = option("pixel", "what is subtracted: pixel = the training set's mean image (its center 224 patch, "
                       "cuda-convnet2; the paper); channel = the per-channel mean (the modern habit)",
                       choices=augment.MEAN_MODES)
    lighting_sigma: float = option(0.1, "std of the PCA lighting alphas (the paper's 0.1); 0 turns lighting off",
                                   minimum=0.0, scope="train")
    lighting_form: str = option("sqrt", "scale of the lighting axes: sqrt = sqrt(eigval) in 0-255 units "
                                "(cuda-convnet2); eigval = fb.resnet.torch's eigenvalues of [0,1] pixels",
                                choices=augment.LIGHTING_FORMS, scope="train")


@dataclass(kw_only=True)
class Feed:
    """How samples are read and decoded (shared by the loaders and alexnet-train)."""

    seed: int = option(0, "seed of the random crops, flips, lighting and shuffling (alexnet-train: also the "
                       "initial weights)")
    num_threads: int | None = option(None, "DALI threads per process (default: every core it may use)", minimum=1,
                                     flag="--threads")
    prefetch: int = option(2, "batches DALI prepares ahead of the one being used", minimum=1)
    decoder: str = option("auto", "JPEG decoding: mixed = nvJPEG on the GPU (its hardware decoder takes "
                          "hw_decoder_load of each batch); cpu = libjpeg-turbo on the DALI threads, the "
                          "augmentation then runs on the GPU; auto = mixed on a GPU, cpu on the CPU",
                          choices=("auto", "mixed", "cpu"))
    # Fastest feed of the full-width training step on an H100 (alexnet-bench train, batch 128, one run):
    # 12,392 images/s at 0.9, against 11,540 at 1.0, 11,292 at 0.5, 10,557 at 0 and 7,462 decoding on 14 CPU
    # threads (README, "Feeding it").
    hw_decoder_load: float = option(0.9, "share of each batch for the hardware JPEG decoder of A100/H100 GPUs "
                                    "(mixed decoding; the rest is CUDA decoding)", minimum=0.0, maximum=1.0)
    shuffle_buffer: int = option(4096, "samples DALI shuffles among as it reads", minimum=1, scope="train")
    shard_shuffle: bool = option(True, "draw a new order of the shards every epoch (with the buffer, a new "
                                 "sample order every epoch); off: every epoch reads the same sequence",
                                 scope="train")


@dataclass(kw_only=True)
class LoaderConfig(Augmentation, Feed):
    """Options of train_loader / eval_loader (their keyword arguments)."""

    shards: Path = option(dataclasses.MISSING, "directory written by alexnet-prep")
    split: str | None = option(None, "split to read (default: train for train_loader, val for eval_loader)")
    batch_size: int = option(128, "samples per batch (per rank)", minimum=1)
    device: str = option("cpu", "cpu, cuda or cuda:N: where DALI works and where the batches are")
    rank: int = option(0, "this process's global rank (its part of the data)", minimum=0)
    world_size: int = option(1, "number of ranks sharing the data", minimum=1)
    dtype: str = option("float32", "float32, or float16 / bfloat16 on a GPU", choices=tuple(DTYPES))
    layout: str = option("NCHW", "NCHW, or NHWC for channels_last tensors", choices=("NCHW", "NHWC"))
    tencrop: bool = option(False, "the paper's ten crops per image, [B, 10, 3, 224, 224]", scope="eval")

    def __post_init__(self):
        self.shards = Path(self.shards)
        check(self)
        if self.split is None:
            raise OptionError("option split: required (train_loader and eval_loader choose it)")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise OptionError(f"option device: must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.dtype != "float32" and not self.on_gpu:
            raise OptionError("option dtype: float16/bfloat16 output is for GPUs; the CPU path gives float32")
        if self.decoder == "mixed" and not self.on_gpu:
            raise OptionError("option decoder: mixed (nvJPEG) decoding needs device='cuda'")
        if not self.rank < self.world_size:
            raise OptionError(f"option rank: {self.rank} is not in [0, world_size={self.world_size})")
        if self.on_gpu and not torch.cuda.is_available():
            raise OptionError(f"option device: {self.device!r} requested but torch sees no GPU; use device='cpu'")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def gpu_decoding(self) -> bool:
        return self.on_gpu and self.decoder in ("auto", "mixed")

    @property
    def device_id(self) -> int | None:
        if not self.on_gpu:
            return None
        return int(self.device.split(":")[1]) if ":" in self.device else torch.cuda.current_device()


def _shard_size(n: int, shard: int, shards_: int) -> int:
    """Samples in DALI's reader shard `shard` of `shards_` (contiguous, sizes differ by at most one)."""
    return n * (shard + 1) // shards_ - n * shard // shards_


def batches_per_epoch(cfg: LoaderConfig, n_samples: int) -> int:
    """Batches every rank yields per epoch: its largest part of the split, padded to whole batches."""
    return math.ceil(max(_shard_size(n_samples, s, cfg.world_size) for s in range(cfg.world_size)) / cfg.batch_size)


def _mean_and_shift(cfg: LoaderConfig, stats: dict, train: bool, drawn: dict):
    """(per-sample mean argument for crop_mirror_normalize, center patch to subtract after it or None)."""
    shift = None
    if train and cfg.lighting_sigma > 0:
        columns = stats["eigvec"] * augment.lighting_scale(stats["eigval"], cfg.lighting_form)
        # shift = sum_j alpha_j * eigvec[:, j] * s_j, computed per sample on the CPU (3 numbers per image)
        for j in range(3):
            drawn[f"alpha{j}"] = fn.random.normal(stddev=cfg.lighting_sigma)
            term = drawn[f"alpha{j}"] * types.Constant(columns[:, j].astype(np.float32))
            shift = term if shift is None else shift + term
    # channel mode subtracts mean_rgb inside crop_mirror_normalize; pixel mode subtracts nothing there
    base = stats["mean_rgb"] if cfg.mean == "channel" else np.zeros(3)
    mean = base.astype(np.float32).tolist() if shift is None else types.Constant(base.astype(np.float32)) - shift
    if cfg.mean == "channel":
        return mean, None
    patch = augment.mean_to_subtract(stats, "pixel").astype(np.float32)
    patch = np.ascontiguousarray(patch if cfg.layout == "NHWC" else patch.transpose(2, 0, 1))
    return mean, types.Constant(patch, device="gpu" if cfg.on_gpu else "cpu")


def _normalize(cfg: LoaderConfig, image, x, y, mirror, mean, patch):
    """The fused pass: crop at integer (x, y), mirror, subtract mean (+ lighting), layout, cast. With a mean
    image `patch`, the pass writes float32, the patch is subtracted, and the result is cast once: DALI's
    arithmetic takes no float16."""
    half = cfg.dtype != "float32"
    out = fn.crop_mirror_normalize(
        image, crop=(augment.CROP, augment.CROP), crop_pos_x=x, crop_pos_y=y, mirror=mirror, mean=mean,
        std=1.0, dtype=types.FLOAT16 if half and patch is None else types.FLOAT,
        output_layout="HWC" if cfg.layout == "NHWC" else "CHW", device="gpu" if cfg.on_gpu else "cpu")
    if patch is None:
        return out
    return fn.cast(out - patch, dtype=types.FLOAT16) if half else out - patch


def build_pipeline(cfg: LoaderConfig, train: bool, expose: bool = False, decode_only: bool = False,
                   checkpoint: str | None = None):
    """The DALI pipeline, built. Outputs (images, labels); with `expose`, also the decoded 256x256 image and
    the random draws, sorted by name (alpha0..2, mirror, x, y; x and y as fractions of the 32-pixel span), so
    tests can replay them through the reference. `decode_only` stops after decoding: the benchmarks' ceiling."""
    paths, n_samples, manifest = shards.readable_split(cfg.shards, cfg.split)
    stats = shards.load_stats(cfg.shards)
    span = manifest["image_size"] - augment.CROP  # crop_pos is normalised: offset = pos * span
    threads = cfg.num_threads or len(os.sched_getaffinity(0))

    # a new shard order every epoch, the same on every rank (one seed), so the ranks' parts stay disjoint
    shard_order = {}
    if train and cfg.shard_shuffle:
        shard_order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": cfg.seed}

    # exec_dynamic: outputs are reference-counted rather than recycled, so the CPU loader can hand torch
    # DALI's own buffers (no copy) and they stay valid however long the caller keeps them.
    @pipeline_def(batch_size=cfg.batch_size, num_threads=threads, device_id=cfg.device_id,
                  seed=cfg.seed * 7919 + cfg.rank, prefetch_queue_depth=cfg.prefetch, exec_dynamic=True,
                  enable_checkpointing=True, checkpoint=checkpoint)
    def graph():
        jpg, label = fn.readers.webdataset(
            paths=[str(p) for p in paths], index_paths=[str(p.with_suffix(".idx")) for p in paths],
            ext=["jpg", shards.LABEL_EXT], dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            shard_id=cfg.rank, num_shards=cfg.world_size, pad_last_batch=True, random_shuffle=train,
            initial_fill=max(1, min(cfg.shuffle_buffer, n_samples)), name="reader", **shard_order)
        if cfg.gpu_decoding:
            image = fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=cfg.hw_decoder_load)
        else:
            image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
            image = image.gpu() if cfg.on_gpu else image  # CPU decoding feeding the GPU augmentation
        if decode_only:
            return image, label
        drawn = {}
        mean, patch = _mean_and_shift(cfg, stats, train, drawn)
        if train:
            # offsets 0..span, each equally likely; k / span is exact in float, so DALI crops at exactly k
            offsets = [k / span for k in range(span + 1)]
            drawn["x"], drawn["y"] = fn.random.uniform(values=offsets), fn.random.uniform(values=offsets)
            drawn["mirror"] = fn.random.coin_flip(probability=0.5)
            out = _normalize(cfg, image, drawn["x"], drawn["y"], drawn["mirror"], mean, patch)
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
        raise ShardError(f"{cfg.shards / cfg.split}: DALI could not open the shards: {e}") from None
    return pipe, n_samples, manifest


class Loader:
    """Iterable of (images, labels) torch tensors on the loader's device; len() is batches per epoch.

    Every rank yields the same number of batches. Positions past the end of this rank's part of the epoch
    (DALI's padding) carry label PAD_LABEL, so losses with ignore_index=-100 and metrics that skip negative
    labels count each sample exactly once.
    """

    def __init__(self, cfg: LoaderConfig, train: bool, state: dict | None = None):
        if train and cfg.tencrop:
            raise OptionError("option tencrop: ten crops are for evaluation (eval_loader), not training")
        self.cfg, self.train = cfg, train
        checkpoint = None if state is None else state["dali"].numpy().tobytes()
        self.pipe, self.n_samples, manifest = build_pipeline(cfg, train, checkpoint=checkpoint)
        self.classes = manifest["classes"]
        self.batches = batches_per_epoch(cfg, self.n_samples)
        self.epoch = 0 if state is None else int(state["epoch"])
        self._position = 0 if state is None else int(state["position"])  # batches of `epoch` taken from DALI
        self._resuming = state is not None
        self._torch_device = torch.device(cfg.device if cfg.on_gpu else "cpu")

    def __len__(self) -> int:
        return self.batches

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    def state_dict(self) -> dict:
        """Where the data stream is: DALI's reader and random-generator states (a uint8 tensor), the epoch and
        the batches of it already taken. `Loader(cfg, train, state)` continues with exactly the next batch."""
        epoch, position = self.epoch, self._position
        if position == self.batches:
            epoch, position = epoch + 1, 0
        dali = torch.frombuffer(bytearray(self.pipe.checkpoint()), dtype=torch.uint8)
        return {"dali": dali, "epoch": epoch, "position": position}

    def _valid(self, epoch: int) -> int:
        # DALI readers move to the next shard every epoch (stick_to_shard=False)
        return _shard_size(self.n_samples, (self.cfg.rank + epoch) % self.cfg.world_size, self.cfg.world_size)

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
        try:
            return self.pipe.run()[:2]
        except RuntimeError:
            # DALI names no file; the shard whose bytes changed since prep wrote it is the likely culprit
            damaged = shards.damaged_shards(self.cfg.shards, self.cfg.split)
            if damaged:
                raise ShardError(f"{damaged[0]}: damaged (its sha256 differs from {shards.MANIFEST}; "
                                 "alexnet-prep --verify checks everything)") from None
            raise

    def __iter__(self):
        # An epoch abandoned part-way (a `break`) leaves DALI's reader mid-epoch; finish it first so that
        # epochs, shard rotation and padding marks stay aligned. A resumed loader continues its epoch instead.
        if not self._resuming and self._position:
            for _ in range(self._position, self.batches):
                self._run()
            self.epoch, self._position = self.epoch + 1, 0
        self._resuming = False
        valid = self._valid(self.epoch)
        for b in range(self._position, self.batches):
            images, labels = self._run()
            self._position = b + 1
            images, labels = self._to_torch(images), self._to_torch(labels).view(-1)
            n_valid = min(max(valid - b * self.cfg.batch_size, 0), self.cfg.batch_size)
            if n_valid < self.cfg.batch_size:
                labels[n_valid:] = PAD_LABEL
            if self.cfg.layout == "NHWC":
                dims = (0, 1, 4, 2, 3) if images.dim() == 5 else (0, 3, 1, 2)
                images = images.permute(*dims)  # a channels_last view of NCHW, no copy
            if self.cfg.dtype == "bfloat16":
                # DALI has no bfloat16: it writes float16 (finer than bfloat16 for these values, at
                # half float32's bytes) and one cast kernel on the GPU makes it bfloat16
                images = images.to(torch.bfloat16)
            yield images, labels
        self.epoch, self._position = self.epoch + 1, 0


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
