"""Top-1 / top-5 error with center crops or the paper's ten crops (softmax averaged over the views).

Every validation image counts exactly once however many ranks share the work: the loader marks DALI's
padding with label PAD_LABEL, and the counts are summed across ranks (one all-reduce at the end).
"""

from __future__ import annotations

import pickle
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .model import AlexNet, AlexNetConfig, place


@dataclass
class EvalConfig:
    """Options of alexnet-eval."""

    shards: Path
    checkpoint: Path
    tencrop: bool = False
    batch_size: int = 128  # images per rank (a ten-crop batch is 10x as many views)
    device: str = "auto"  # "auto": this rank's GPU if there is one, else the CPU
    threads: int | None = None


def autocast(device: torch.device):
    """bfloat16 autocast on GPUs (the trainer's precision); float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def batch_format(device: torch.device) -> dict:
    """The loader options that match `autocast` and `place`: bfloat16 channels_last batches on GPUs."""
    gpu = device.type == "cuda"
    return {"dtype": "bfloat16" if gpu else "float32", "layout": "NHWC" if gpu else "NCHW"}


def predictions(model, loader, tencrop: bool):
    """(probabilities [B, classes], labels [B]) per batch; ten-crop averages the softmax over the views."""
    model.eval()
    with torch.inference_mode():
        for images, labels in loader:
            with autocast(images.device):
                logits = model(images.flatten(0, 1) if tencrop else images)
            probs = logits.float().softmax(1)
            if tencrop:
                probs = probs.view(images.shape[0], images.shape[1], -1).mean(1)
            yield probs, labels.to(probs.device)


def error_counts(model, loader, tencrop: bool = False) -> torch.Tensor:
    """[images, top-1 hits, top-5 hits] over the whole split (summed over ranks), on the model's device.
    Nothing here waits for the device until the caller reads the result."""
    counts = None
    for probs, labels in predictions(model, loader, tencrop):
        top = probs.topk(min(5, probs.shape[1]), 1).indices
        hit, valid = top == labels[:, None], labels >= 0  # padding (PAD_LABEL) is never counted
        batch = torch.stack([valid.sum(), (hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum()])
        counts = batch if counts is None else counts + batch
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def errors(counts: torch.Tensor) -> dict:
    """{"images", "top1_error", "top5_error"} from error_counts (a host sync)."""
    n, top1, top5 = counts.tolist()
    return {"images": int(n), "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n}


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by alexnet-train (plain tensors and Python values: weights_only=True)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a checkpoint alexnet-train can read ({str(e).splitlines()[0]})") from None
    missing = {"model", "model_config", "config", "classes", "epoch"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path}: not an alexnet-train checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def load_model(checkpoint: dict, device: torch.device) -> AlexNet:
    """The grouped AlexNet of a checkpoint written by alexnet-train (any layout it was trained in)."""
    net = AlexNet(AlexNetConfig(**checkpoint["model_config"]))
    net.load_state_dict(checkpoint["model"])
    return place(net, device)


def run(cfg: EvalConfig) -> dict:
    """Center-crop (and with cfg.tencrop, ten-crop) errors of a checkpoint over SHARDS/val, on every rank of
    torchrun's world if launched by it. Returns {"center": errors, "tencrop": errors?, ...}."""
    from . import distributed
    from .pipeline import Loader, LoaderConfig

    world = distributed.setup(cfg.device)
    try:
        ckpt = read_checkpoint(cfg.checkpoint)
        model = load_model(ckpt, world.device)
        result = {"checkpoint": str(cfg.checkpoint), "epoch": ckpt["epoch"], "classes": len(ckpt["classes"]),
                  "ranks": world.size, "device": str(world.device)}
        for name, tencrop in (("center", False), ("tencrop", True))[:1 + cfg.tencrop]:
            lcfg = LoaderConfig(cfg.shards, "val", cfg.batch_size, str(world.device), world.rank, world.size,
                                mean=ckpt["config"]["mean"], tencrop=tencrop, num_threads=cfg.threads,
                                **batch_format(world.device))  # the mean the network was trained with
            loader = Loader(lcfg, train=False)
            if loader.classes != ckpt["classes"]:
                raise ValueError(f"{cfg.checkpoint}: trained on other classes than {cfg.shards} holds")
            result[name] = errors(error_counts(model, loader, tencrop))
        return result if world.main else {}
    finally:
        world.close()
