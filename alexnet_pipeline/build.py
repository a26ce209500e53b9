"""The one builder of a training run's parts: its loaders, network, optimizer and step, from its config.

alexnet-train, alexnet-bench train and tools/step_profile.py build here, so the step that is timed is the
step that trains, fed through the same loader with the same copies and casts. `cfg` is a TrainConfig (or
anything with its fields); nothing here reads RUN/ or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import Checkpoint
from .config import UserError
from .distributed import World
from .model import AlexNet, AlexNetConfig, place
from .optim import PaperSGD
from .options import Augmentation, Decoding, LoaderConfig, Order
from .step import TrainStep


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
    """This rank's loader: its share of the global batch, the run's augmentation, order and decoding."""
    shared = {f.name: getattr(cfg, f.name) for group in (Augmentation, Order, Decoding) for f in fields(group)}
    return LoaderConfig(**shared, shards=cfg.shards, split=split, batch_size=per_rank_batch(cfg.global_batch, world),
                        device=str(world.device), rank=world.rank, world_size=world.size,
                        **batch_format(world.device, cfg.precision), **extra)


def train_loader(cfg, world: World, ckpt: Checkpoint | None = None):
    """The run's train loader, built once for every epoch; from a checkpoint, at its exact data position
    (or, saved by another number of ranks, at the start of its epoch, drawn afresh)."""
    from .pipeline import Loader  # DALI: only where a loader is built (the step alone needs none)

    state = ckpt.rank_state(world.rank, world.size) if ckpt else None
    first_epoch = ckpt.epoch if ckpt and state is None else 0
    return Loader(loader_config(cfg, world, "train"), True, state.loader if state else None, first_epoch)


def eval_loader(cfg, world: World, tencrop: bool = False):
    """This rank's part of the validation split, center crops (or the ten crops)."""
    from .pipeline import Loader

    return Loader(loader_config(cfg, world, "val", tencrop=tencrop), False)


def optimizer_for(cfg, net) -> PaperSGD:
    """The run's optimizer over `net` (the network itself, not a wrapper)."""
    return PaperSGD(net.named_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.decay_biases,
                    cfg.momentum_rule)


def network(cfg, num_classes: int, world: World, ckpt: Checkpoint | None = None):
    """The network as it runs: the seed's initial weights (the same on every rank) or the checkpoint's,
    placed on this rank's device, or as the paper's two columns."""
    torch.manual_seed(cfg.seed)
    net = AlexNet(AlexNetConfig(num_classes, cfg.variant, cfg.width, init=cfg.init))
    if ckpt is not None:
        net.load_state_dict(ckpt.weights)
    columns = cfg.column_devices.split(",") if cfg.column_devices else None
    if cfg.model_parallel and columns is None and world.device.type == "cuda" and \
            torch.cuda.device_count() < world.device.index + 2:
        raise UserError(f"option model_parallel: needs a second GPU after {world.device} (torch sees "
                        f"{torch.cuda.device_count()}); --column-devices cuda:0,cuda:0 puts both columns on one")
    return place(net, world.device, cfg.model_parallel, columns)


@dataclass
class Training:
    """`net` is the network itself (AlexNet, or its two columns), whose weights and momentum are saved;
    `model` is what the step calls: `net`, or `net` inside DDP and/or torch.compile."""

    net: torch.nn.Module
    model: torch.nn.Module
    optimizer: PaperSGD
    step: TrainStep

    def grouped_weights(self) -> dict:
        """The weights in AlexNet's (grouped) layout, on the CPU: a checkpoint loads on any machine."""
        if hasattr(self.net, "grouped_state_dict"):
            return self.net.grouped_state_dict()
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}


def training(cfg, num_classes: int, world: World, ckpt: Checkpoint | None = None, adapt=None) -> Training:
    """Network (with the checkpoint's weights), optimizer and step, as alexnet-train runs them: DDP over
    several ranks, torch.compile and a CUDA graph on one GPU unless turned off. `adapt(net)`, if given, may
    change the placed network before the rest is built (tools/step_profile.py's earlier forms of the step).
    The checkpoint's optimizer state is restored by Checkpoint.restore_training, before the first step."""
    net = network(cfg, num_classes, world, ckpt)
    if adapt is not None:
        adapt(net)
    optimizer = optimizer_for(cfg, net)
    gpu = world.device.type == "cuda"
    model = net
    if world.size > 1:  # a model split over two GPUs takes no device_ids
        model = DistributedDataParallel(model, device_ids=[world.device] if gpu and not cfg.model_parallel else None)
    model = torch.compile(model) if cfg.compile and gpu else model
    graph = cfg.cuda_graph and gpu and world.size == 1 and not cfg.model_parallel
    return Training(net, model, optimizer, TrainStep(model, optimizer, world.device, cfg.precision, graph=graph))
