"""The one builder of a training run's parts: its loaders, network, optimizer and step, from its config.

alexnet-train, alexnet-bench train and tools/step_profile.py build here, so the step that is timed is the
step that trains, fed through the same loader with the same copies and casts. `cfg` is a TrainConfig (or
anything with its fields); nothing here reads RUN/ or writes.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Checkpoint
from .config import UserError
from .distributed import World
from .model import AlexNet, AlexNetConfig, TwoColumnAlexNet, place
from .optim import PaperSGD
from .options import Augmentation, Cache, Decoding, LoaderConfig, Order
from .step import TrainStep

if typing.TYPE_CHECKING:
    from .pipeline import Loader  # DALI is imported only where a loader is built


def batch_format(device: torch.device, precision: str = "bf16") -> dict:
    """The loader options that match `autocast` and `place`: bfloat16 channels_last batches on GPUs (float32
    channels_last with precision fp32), float32 NCHW on the CPU."""
    gpu = device.type == "cuda"
    return {"dtype": "bfloat16" if gpu and precision == "bf16" else "float32", "channels_last": gpu}


def per_rank_batch(global_batch: int, world: World) -> int:
    if global_batch % world.size:
        raise UserError(f"option global_batch: {global_batch} does not split evenly over {world.size} ranks")
    return global_batch // world.size


def loader_config(cfg, world: World, split: str, **extra) -> LoaderConfig:
    """This rank's loader: its share of the global batch, the run's augmentation, order, decoding and storage."""
    shared = {f.name: getattr(cfg, f.name) for group in (Augmentation, Order, Decoding, Cache)
              for f in fields(group)}
    return LoaderConfig(**shared, shards=cfg.shards, split=split, batch_size=per_rank_batch(cfg.global_batch, world),
                        device=str(world.device), rank=world.rank, world_size=world.size,
                        **batch_format(world.device, cfg.precision), **extra)


def training_loader(cfg, world: World, state: dict | None = None):
    """The run's train loader, built once for every epoch: fresh, or at a saved data position (`state`, saved
    on any number of ranks with the run's global batch)."""
    from .pipeline import Loader  # DALI: only where a loader is built (the step alone needs none)

    return Loader(loader_config(cfg, world, "train"), True, state)


def evaluation_loader(shards: Path | str, world: World, *, mean: str, precision: str, batch_size: int,
                      tencrop: bool = False, split: str = "val", options: dict | None = None,
                      samples: int | None = None) -> Loader:
    """The one builder of evaluation loaders (a run's validation, alexnet-eval, the paper's figures): this
    rank's part of `split` (with `samples`, of its first shards holding that many), center crops (or the ten
    crops), with the mean and the tensor format the network was trained with, and the loaders' decoding and
    storage `options` (threads, decoder, cache_dir, ...; their defaults if None)."""
    from .pipeline import Loader

    cfg = LoaderConfig(**(options or {}), shards=shards, split=split, batch_size=batch_size,
                       device=str(world.device), rank=world.rank, world_size=world.size, mean=mean, tencrop=tencrop,
                       **batch_format(world.device, precision))
    return Loader(cfg, train=False, samples=samples)


def validation_loader(cfg, world: World, tencrop: bool = False) -> Loader:
    """A training run's validation loader: its share of the global batch, its mean, precision, decoding and
    storage."""
    return evaluation_loader(cfg.shards, world, mean=cfg.mean, precision=cfg.precision,
                             batch_size=per_rank_batch(cfg.global_batch, world), tencrop=tencrop,
                             options={f.name: getattr(cfg, f.name) for group in (Decoding, Cache)
                                      for f in fields(group)})


def optimizer_for(cfg, net) -> PaperSGD:
    """The run's optimizer over `net` (the network itself, not a wrapper)."""
    return PaperSGD(net.named_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.decay_biases,
                    cfg.momentum_rule)


def network(cfg, num_classes: int, world: World, weights: dict | None = None):
    """The network as it runs: the seed's initial weights (the same on every rank) or `weights` (grouped
    layout), placed on this rank's device, or as the paper's two columns."""
    torch.manual_seed(cfg.seed)
    net = AlexNet(AlexNetConfig(num_classes, cfg.variant, cfg.width, init=cfg.init))
    if weights is not None:
        net.load_state_dict(weights)
    columns = cfg.column_devices.split(",") if cfg.column_devices else None
    if cfg.model_parallel and columns is None and world.device.type == "cuda" and \
            torch.cuda.device_count() < world.device.index + 2:
        raise UserError(f"option model_parallel: needs a second GPU after {world.device} (torch sees "
                        f"{torch.cuda.device_count()}); --column-devices cuda:0,cuda:0 puts both columns on one")
    return place(net, world.device, cfg.model_parallel, columns)


@dataclass
class Parts:
    """`net` is the network itself (AlexNet, or its two columns), whose weights and momentum are saved;
    `model` is what the step calls: `net`, or `net` inside DDP and/or torch.compile."""

    net: AlexNet | TwoColumnAlexNet
    model: torch.nn.Module
    optimizer: PaperSGD
    step: TrainStep

    def grouped_weights(self) -> dict:
        """The weights in AlexNet's (grouped) layout, on the CPU: a checkpoint loads on any machine."""
        if isinstance(self.net, TwoColumnAlexNet):
            return self.net.grouped_state_dict()
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}


def build_parts(cfg, num_classes: int, world: World, weights: dict | None = None, adapt=None) -> Parts:
    """Network (fresh, or with `weights`), optimizer and step, as alexnet-train runs them: DDP over several
    ranks, torch.compile and a CUDA graph on one GPU unless turned off. `adapt(net)`, if given, may change
    the placed network before the rest is built (tools/step_profile.py's earlier forms of the step)."""
    net = network(cfg, num_classes, world, weights)
    if adapt is not None:
        adapt(net)
    optimizer = optimizer_for(cfg, net)
    gpu = world.device.type == "cuda"
    model: nn.Module = net
    if world.size > 1:  # a model split over two GPUs takes no device_ids
        model = DistributedDataParallel(model, device_ids=[world.device] if gpu and not cfg.model_parallel else None)
    if cfg.compile and gpu:
        model = typing.cast(nn.Module, torch.compile(model))  # an OptimizedModule: a Module that compiles
    graph = cfg.cuda_graph and gpu and world.size == 1 and not cfg.model_parallel
    return Parts(net, model, optimizer, TrainStep(model, optimizer, world.device, cfg.precision, graph=graph))


@dataclass
class Run:
    """A training run's parts and where it stands: what `start_run` gives the trainer."""

    parts: Parts
    train_loader: Loader
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    note: str | None = None  # said once when the run starts (a resume on another number of ranks)


def start_run(cfg, num_classes: int, world: World, schedule, ckpt: Checkpoint | None = None) -> Run:
    """The run's network, optimizer, step and train loader: fresh, or continued from `ckpt`. The one place
    a checkpoint is restored, in the order that matters: the weights into the network before it is placed
    (as the paper's two columns, say), the optimizer's momentum, the `schedule` (lr, drops, plateau count),
    this rank's data position, and last this rank's random generators, since building the network drew its
    initial weights from them. A checkpoint saved by another number of ranks continues at the same global
    step (the global batch is the run's; each rank takes its new share), with dropout's generators seeded
    afresh per rank."""
    parts = build_parts(cfg, num_classes, world, ckpt.weights if ckpt else None)
    if ckpt is None:
        return Run(parts, training_loader(cfg, world))
    state = ckpt.training_state()
    parts.optimizer.load_state_dict(state.optimizer)
    schedule.load_state_dict(state.schedule)
    loader = training_loader(cfg, world, ckpt.loader_state(world.rank, world.size))
    rank, note = ckpt.rank_state(world.rank, world.size), None
    if rank is None:
        torch.manual_seed(cfg.seed * 1_000_003 + ckpt.step * 1_009 + world.rank)
        note = (f"checkpoint from {len(state.ranks)} ranks, now {world.size}: the data continues at step "
                f"{loader.position} of epoch {loader.epoch + 1} (global batch {cfg.global_batch}); dropout drawn "
                "afresh")
    else:
        rank.restore_generators(world.device)
    return Run(parts, loader, ckpt.epoch, ckpt.step, list(ckpt.history), note)
