"""The option groups the commands share, each option declared once (config.option): the commands and the
loaders compose these groups into their own typed configs, so a name has one default, one help text and one
check everywhere. Run-specific options (epochs, the optimizer, the output directory) stay with their command.

    Shards        shards (a directory or a URL), with Cache: cache_dir, cache_size, read_ahead (and Storage's)
    Storage       storage_timeout              every command that may reach a store
    Device        device                       where it runs (auto: the GPU if there is one)
    Placement     device, backend              commands that may run as torchrun ranks
    Batch         batch_size                   samples per batch and per rank (a loader's batch)
    Augmentation  mean, lighting_sigma, lighting_form
    Order         seed, shard_shuffle, shuffle_window, streams, draws
    Decoding      num_threads, prefetch, decoder, hw_decoder_load, batches_per_run, preallocate, stream_ordered
    Tensors       dtype, channels_last         what a loader's batches look like
    Network       variant, width, init         the model
    Stepping      precision, compile, cuda_graph   how the training step runs
    Output        json
    ImageNetRoot, Workers   prep's source and processes (alexnet-prep, alexnet-bench prep)
    Weights       checkpoint                   commands that use a trained network
    Seed          seed                         every random choice (prep's shuffle; training's draws and weights)
    TenCrop       tencrop                      the paper's ten crops (eval, predict, the eval loader)
    Timing, Steps, Record   repeats, steps, record   the benchmarks

LoaderConfig composes the loader's groups; train_loader / eval_loader take its fields as keyword options.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .config import OptionError, check, option

# model.INITS, step.PRECISIONS and augment's modes, written out: the options depend on no module that does the
# work, so prep (which declares its options from these groups) starts without torch, and the shard format's
# and prep's modules need nothing of training's (tests/test_imports.py holds them equal)
INITS = ("paper", "caffe")
PRECISIONS = ("bf16", "fp32")
MEAN_MODES, LIGHTING_FORMS = ("channel", "pixel"), ("sqrt", "eigval")
BACKENDS = ("auto", "nccl", "gloo")
DTYPES = ("float32", "float16", "bfloat16")
DRAWS = ("host", "dali")


def _device_problem(name: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        return None
    return "must be auto, cpu, cuda or cuda:N"


@dataclass(kw_only=True)
class Storage:
    storage_timeout: float = option(120.0, "seconds a store may keep failing (refused, timing out) before the "
                                    "command stops, naming the URL", minimum=0.0)


@dataclass(kw_only=True)
class Cache(Storage):
    """Where a store's shards are kept on this machine."""

    cache_dir: Path | None = option(None, "node cache for shards in a store (s3://, gs://, ...): whole shards "
                                    "fetched ahead in this node's reading order, shared by its ranks (default "
                                    "~/.cache/alexnet-pipeline/shards)")
    cache_size: str | None = option(None, "bound on the node cache's bytes, e.g. 200G (default: no bound): "
                                    "shards already read are evicted, the one read latest first",
                                    validate=storage.size_problem)
    read_ahead: int = option(16, "shards each rank fetches ahead of the ones it is reading", minimum=1)

    @property
    def cache_bytes(self) -> int | None:
        return None if self.cache_size is None else storage.parse_size(self.cache_size)


@dataclass(kw_only=True)
class Shards(Cache):
    shards: Path | str = option(dataclasses.MISSING, "directory written by alexnet-prep, or its URL in a store "
                                "(s3://bucket/prefix, gs://..., https://..., file://...)")


@dataclass(kw_only=True)
class Output:
    json: bool = option(False, "print one JSON object instead of a table")


@dataclass
class ImageNetRoot:
    imagenet_root: Path = option(dataclasses.MISSING, "ImageNet as folders, the official tars, Kaggle's or Hugging "
                                 "Face's layout (found by itself)", recipe=True)


@dataclass(kw_only=True)
class Workers:
    workers: int = option(0, "processes (0: every core this process may use)", minimum=0)


@dataclass(kw_only=True)
class Weights:
    """The option of the commands that use a trained network (alexnet-eval, alexnet-predict, alexnet-export)."""

    checkpoint: Path = option(dataclasses.MISSING, "RUN/best.pt or RUN/checkpoint.pt written by alexnet-train")


@dataclass(kw_only=True)
class Seed:
    seed: int = option(0, "seed of every random choice: prep's global shuffle of the train split; training's "
                       "crops, flips, lighting, shuffling and initial weights", minimum=0, recipe=True)


@dataclass(kw_only=True)
class TenCrop:
    tencrop: bool = option(False, "the paper's ten crops (the 4 corners and the center, and their mirrors; "
                           "predictions softmax-averaged): alexnet-eval reports them beside the center crop, "
                           "alexnet-predict uses them instead, a loader gives [B, 10, 3, 224, 224]", scope="eval")


@dataclass(kw_only=True)
class Timing:
    repeats: int = option(5, "timed repeats (median), after a warm-up", minimum=1)


@dataclass(kw_only=True)
class Steps:
    steps: int = option(50, "batches (training steps) per timed repeat", minimum=1)


@dataclass(kw_only=True)
class Record:
    record: Path | None = option(None, "also write the result as JSON to this file, rewritten as each row is "
                                 "measured (a run cut short keeps the rows it has)")


@dataclass(kw_only=True)
class Device:
    device: str = option("auto", "auto (this rank's GPU if there is one, else the CPU), cpu, cuda or cuda:N",
                         validate=_device_problem)


@dataclass(kw_only=True)
class Placement(Device):
    """Where a command runs (alexnet-train, alexnet-eval): one process, or one of torchrun's ranks."""

    backend: str = option("auto", "torch.distributed backend under torchrun: auto (nccl on GPUs, gloo on the CPU), "
                          "nccl, or gloo (e.g. several ranks sharing one GPU, which NCCL refuses)", choices=BACKENDS)


@dataclass(kw_only=True)
class Batch:
    batch_size: int = option(128, "samples per batch and per rank (a ten-crop batch is 10x as many views)",
                             minimum=1)


@dataclass(kw_only=True)
class Augmentation:
    """The paper's augmentation and normalisation."""

    mean: str = option("pixel", "what is subtracted: pixel = the training set's mean image (its center 224 patch, "
                       "cuda-convnet2; the paper); channel = the per-channel mean (the modern habit)",
                       choices=MEAN_MODES, recipe=True)
    lighting_sigma: float = option(0.1, "std of the PCA lighting alphas (the paper's 0.1); 0 turns lighting off",
                                   minimum=0.0, scope="train", recipe=True)
    lighting_form: str = option("sqrt", "scale of the lighting axes: sqrt = sqrt(eigval) in 0-255 units "
                                "(cuda-convnet2); eigval = fb.resnet.torch's eigenvalues of [0,1] pixels",
                                choices=LIGHTING_FORMS, scope="train", recipe=True)


@dataclass(kw_only=True)
class Order(Seed):
    """Which samples come when, and the random draws of the augmentation."""

    shard_shuffle: bool = option(True, "a new order every epoch: the shards permuted, the samples mixed within "
                                 "windows of shards; off: every epoch reads the prepared order (which prep "
                                 "shuffled once)", scope="train", recipe=True)
    shuffle_window: int = option(4, "shards whose samples are mixed together (0: the whole split, a true "
                                 "global permutation, for local disks); what a rank holds open per stream",
                                 minimum=0, scope="train", recipe=True)
    streams: int = option(16, "parts of each epoch's order read side by side; with a number of ranks (and "
                          "nodes) that divides it, each reads its own parts, so a node fetches only its share "
                          "of the shards", minimum=1, recipe=True)
    draws: str = option("host", "where the per-image crop, flip and lighting draws come from: host = one "
                        "operator drawing them for the whole batch from a counter-based generator keyed on "
                        "(seed, epoch, position in the epoch's order), the same whatever the DALI batch and "
                        "the number of ranks; dali = DALI's random operators (12 operators per batch)",
                        choices=DRAWS, scope="train", recipe=True)


# DALI's cost per run on the CPU graph: on 2 cores the train loader made 2,456 / 2,777 / 3,056 images/s with runs
# of 64 / 128 / 256 images (tools/run_size_ab.py), and no more with 512 (docs/results.md, "Runs of 256 images on
# the CPU").
# A GPU keeps one batch a run until the feed round measures it there.
CPU_RUN_IMAGES = 256


@dataclass(kw_only=True)
class Decoding:
    """How samples are read and decoded; none of it changes what a batch holds."""

    num_threads: int | None = option(None, "DALI threads per process (default: the cores this process may use, "
                                     "divided by the ranks on this machine, LOCAL_WORLD_SIZE)", minimum=1,
                                     flag="--threads")
    prefetch: int = option(2, "DALI runs prepared ahead of the one being used", minimum=1)
    decoder: str = option("auto", "JPEG decoding: mixed = nvJPEG on the GPU (its hardware decoder takes "
                          "hw_decoder_load of each batch); cpu = libjpeg-turbo on the DALI threads, the "
                          "augmentation then runs on the GPU; auto = mixed on a GPU, cpu on the CPU",
                          choices=("auto", "mixed", "cpu"))
    # 0.9 was the fastest share in the one H100 measurement, on a 2,007-image set whose loader was rebuilt every
    # epoch (docs/results.md calls those rows superseded); DALI's own default is 0.65. The GPU round's loader
    # table (hw_decoder_load x threads) decides it on ImageNet-sized data; until then 0.9 stays, unmeasured.
    hw_decoder_load: float = option(0.9, "share of each batch for the hardware JPEG decoder of A100/H100 GPUs "
                                    "(mixed decoding; the rest is CUDA decoding)", minimum=0.0, maximum=1.0)
    batches_per_run: int | None = option(None, "batches DALI makes per run: one run of batch_size x this many "
                                         "samples, sliced into batches in order (DALI's cost per run is amortised "
                                         "over more images; the batches, their order and padding are the same); "
                                         f"default: runs of at least {CPU_RUN_IMAGES} images (ten-crop views) on "
                                         "the CPU, at most an epoch's batches; 1 on a GPU", minimum=1)
    preallocate: bool = option(False, "mixed decoding: preallocate the decoder's buffers for 256x256 images "
                               "(every prepared image is)")
    stream_ordered: bool = option(False, "GPU: order DALI's outputs on torch's current CUDA stream "
                                  "(pipe.run(cuda_stream=...)) instead of waiting for them on the host")
    # Off until measured faster: on 2 CPU cores the train loader with it ran 0.90-1.10x, decoding alone 0.91-0.95x
    # (three runs; docs/results.md, "Decoding only the crop"); the GPU round's loader table times it.
    crop_decode: bool = option(False, "train: decode only the random 224x224 window (libjpeg-turbo's ROI "
                               "decoding) where JPEGs are decoded on CPU threads (decoder cpu, the CPU loader); "
                               "mixed decoding decodes whole images (DALI's hardware decoder cannot decode a "
                               "window)", scope="train")


@dataclass(kw_only=True)
class Tensors:
    dtype: str = option("float32", "float32, or float16 / bfloat16 on a GPU", choices=DTYPES)
    channels_last: bool = option(False, "batches as channels_last tensors (NHWC in memory)")


@dataclass(kw_only=True)
class Network:
    variant: str = option("paper", "paper (two columns, LRN) or torchvision (one column, no LRN)",
                          choices=("paper", "torchvision"), recipe=True)
    width: float = option(1.0, "channel multiplier (quick CPU runs)", minimum=1e-3, recipe=True)
    init: str = option("paper", "paper: N(0, 0.01), biases 1 on conv2/4/5, fc6/7; caffe: bvlc_alexnet's "
                       "(biases 0.1, std 0.005 on fc6/7)", choices=INITS, recipe=True)


@dataclass(kw_only=True)
class Stepping:
    precision: str = option("bf16", "GPU arithmetic: bf16 autocast (rounds inputs to about 0.5-1 unit of 255; "
                            "a deviation) or fp32 (the paper); the CPU always uses fp32", choices=PRECISIONS,
                            recipe=True)
    compile: bool = option(True, "torch.compile the network on GPUs (fuses LRN, activations and layout changes; "
                           "about a minute at start); the CPU runs it eagerly")
    cuda_graph: bool = option(True, "capture the whole step as a CUDA graph (one process on one GPU; DDP and "
                              "model parallelism run eagerly)")


def default_threads() -> int:
    """Threads of one rank: the cores this process may use divided by the ranks torchrun started on this
    machine (LOCAL_WORLD_SIZE), at least 1. Every rank taking every core would run ranks x cores threads (and
    the mixed decoder's pool of as many again)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_device(name: str, local_rank: int = 0):
    """The torch.device of a device option: "auto" is this process's GPU (cuda:LOCAL_RANK) if torch sees one,
    else the CPU; "cuda" is cuda:LOCAL_RANK. A GPU asked for where torch sees none is an OptionError."""
    import torch

    problem = _device_problem(name)
    if problem:
        raise OptionError(f"option device: {problem}; got {name!r}")
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"option device: {name!r} requested but torch sees no GPU; use cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise OptionError(f"option device: {name!r} but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


@dataclass(kw_only=True)
class LoaderConfig(Shards, Device, Batch, Augmentation, Order, Decoding, Tensors, TenCrop):
    """Options of train_loader / eval_loader (their keyword arguments)."""

    split: str | None = option(None, "split to read (default: train for train_loader, val for eval_loader)")
    rank: int = option(0, "this process's global rank (its part of the data)", minimum=0)
    world_size: int = option(1, "number of ranks sharing the data", minimum=1)

    def __post_init__(self):
        check(self)
        self.shards = storage.location(self.shards)
        self.device = str(resolve_device(self.device)) if self.device == "auto" else self.device
        if self.split is None:
            raise OptionError("option split: required (train_loader and eval_loader choose it)")
        if self.dtype != "float32" and not self.on_gpu:
            raise OptionError("option dtype: float16/bfloat16 output is for GPUs; the CPU path gives float32")
        if self.decoder == "mixed" and not self.on_gpu:
            raise OptionError("option decoder: mixed (nvJPEG) decoding needs a GPU device")
        if not self.rank < self.world_size:
            raise OptionError(f"option rank: {self.rank} is not in [0, world_size={self.world_size})")
        if self.on_gpu:
            resolve_device(self.device)  # a GPU that torch cannot see is named here, before DALI starts

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def split_name(self) -> str:
        """The split, which __post_init__ made sure is set (train_loader and eval_loader choose it)."""
        assert self.split is not None
        return self.split

    @property
    def threads(self) -> int:
        """DALI threads of this loader: num_threads, or this rank's share of the cores."""
        return self.num_threads or default_threads()

    @property
    def gpu_decoding(self) -> bool:
        return self.on_gpu and self.decoder in ("auto", "mixed")

    @property
    def crop_decoding(self) -> bool:
        """Whether the train graph decodes only its crop: CPU decoding, unless crop_decode is off."""
        return self.crop_decode and not self.gpu_decoding

    @property
    def per_run(self) -> int:
        """Batches per DALI run, in a loader's config (runs_for sets them)."""
        assert self.batches_per_run is not None, "a loader's config (runs_for) sets batches_per_run"
        return self.batches_per_run

    @property
    def run_size(self) -> int:
        """Samples per DALI run."""
        return self.batch_size * self.per_run

    def runs_for(self, steps: int) -> "LoaderConfig":
        """This config with batches_per_run set for a loader of `steps` batches an epoch: as given, or the
        default (a GPU: 1; the CPU: runs of CPU_RUN_IMAGES images or views, no more than the epoch's batches,
        whose excess would be padding decoded for nothing)."""
        if self.batches_per_run is not None:
            return self
        views = self.batch_size * (10 if self.tencrop else 1)
        runs = 1 if self.on_gpu else min(-(-CPU_RUN_IMAGES // views), max(1, steps))
        return dataclasses.replace(self, batches_per_run=runs)
