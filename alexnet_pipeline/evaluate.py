"""Top-1 / top-5 error with center crops or the paper's ten crops (softmax averaged over the views).

Every validation image counts exactly once however many ranks share the work: the loader marks DALI's
padding with label PAD_LABEL, and the counts are summed across ranks (one all-reduce at the end).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import distributed, storage
from .checkpoint import Checkpoint
from .config import UserError, check, option
from .options import Batch, Cache, Decoding, Output, Placement, Shards, TenCrop, Weights
from .step import autocast


@dataclass(kw_only=True)
class EvalConfig(Shards, Weights, Placement, Batch, Decoding, TenCrop, Output):
    """Options of alexnet-eval. The preprocessing (mean mode) and the precision come from the checkpoint, so
    a model is always evaluated as it was trained."""

    figures: bool = option(False, "also draw the paper's Figures 3 and 4: filters.png, predictions.png, "
                           "neighbours.png")
    figures_out: Path | None = option(None, "where the figures go (default: figures/ beside the checkpoint; the "
                                      "run's own filters.png is training's)")
    neighbour_pool: int = option(10_000, "figures: training images searched for the nearest neighbours in fc7 "
                                 "(the paper: all of them; the search streams, so memory does not grow with it)",
                                 minimum=1)

    def __post_init__(self):
        check(self)
        self.shards, self.checkpoint = storage.location(self.shards), Path(self.checkpoint)
        self.figures_out = None if self.figures_out is None else Path(self.figures_out)


def predictions(model, loader, tencrop: bool, precision: str = "bf16"):
    """(probabilities [B, classes], labels [B]) per batch; ten-crop averages the softmax over the views."""
    model.eval()
    with torch.inference_mode():
        for images, labels in loader:
            with autocast(images.device, precision):
                logits = model(images.flatten(0, 1) if tencrop else images)
            probs = logits.float().softmax(1)
            if tencrop:
                probs = probs.view(images.shape[0], images.shape[1], -1).mean(1)
            yield probs, labels.to(probs.device)


def error_counts(model, loader, tencrop: bool = False, precision: str = "bf16") -> torch.Tensor:
    """[images, top-1 hits, top-5 hits] over the whole split (summed over ranks), on the model's device.
    Nothing here waits for the device until the caller reads the result."""
    counts: torch.Tensor | None = None
    # all of it in inference mode: the counts are made from inference tensors, and the all-reduce updates
    # them in place (gloo copies CUDA tensors back into them)
    with torch.inference_mode():
        for probs, labels in predictions(model, loader, tencrop, precision):
            top = probs.topk(min(5, probs.shape[1]), 1).indices
            hit, valid = top == labels[:, None], labels >= 0  # padding (PAD_LABEL) is never counted
            batch = torch.stack([valid.sum(), (hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum()])
            counts = batch if counts is None else counts + batch
        assert counts is not None  # every rank's loader yields at least one batch (padded, if need be)
        if dist.is_initialized():
            dist.all_reduce(counts)
    return counts


def errors(counts: torch.Tensor) -> dict:
    """{"images", "top1_error", "top5_error"} from error_counts (a host sync)."""
    n, top1, top5 = counts.tolist()
    return {"images": int(n), "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n}


def run(cfg: EvalConfig) -> dict:
    """Center-crop (and with cfg.tencrop, ten-crop) errors of a checkpoint over SHARDS/val, on every rank of
    torchrun's world if launched by it. Returns {"center": errors, "tencrop": errors?, ...} on rank 0."""
    from .build import evaluation_loader
    from .config import subset

    storage.configure(cfg.storage_timeout)
    world = distributed.setup(cfg.device, cfg.backend)
    try:
        ckpt = Checkpoint.load(cfg.checkpoint)
        precision = ckpt.config["precision"]  # evaluate with the preprocessing and precision it was trained with
        model = ckpt.network(world.device)
        result = {"checkpoint": str(cfg.checkpoint), "epoch": ckpt.epoch, "classes": len(ckpt.classes),
                  "ranks": world.size, "device": str(world.device), "mean": ckpt.preprocessing["mean"],
                  "precision": precision if world.device.type == "cuda" else "fp32"}
        for name, tencrop in (("center", False), ("tencrop", True))[:1 + cfg.tencrop]:
            loader = evaluation_loader(cfg.shards, world, mean=ckpt.preprocessing["mean"], precision=precision,
                                       batch_size=cfg.batch_size, tencrop=tencrop,
                                       options={**subset(cfg, Decoding), **subset(cfg, Cache)})
            if loader.classes != ckpt.classes:
                raise UserError(f"{cfg.checkpoint}: trained on other classes than {cfg.shards} holds")
            result[name] = errors(error_counts(model, loader, tencrop, precision))
        if cfg.figures and world.main:
            from .figures import paper_figures

            drawn = paper_figures(ckpt, cfg.shards, cfg.figures_out or cfg.checkpoint.parent / "figures", world.device,
                                  cfg.neighbour_pool, cfg.batch_size, progress=sys.stderr.isatty())
            result["figures"] = {k: str(v) for k, v in drawn["paths"].items()} | {"neighbour_pool": drawn["pool"]}
        return result if world.main else {}
    finally:
        world.close()
