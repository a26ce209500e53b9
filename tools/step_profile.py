#!/usr/bin/env python3
"""Where a training step's GPU time goes, from the step as it was to the step as alexnet-train runs it now.

    python tools/step_profile.py [--batch-size 128] [--steps 50] [--repeats 5] [--record OUT.json]

Full-width paper AlexNet (1000 classes), bfloat16 autocast, channels_last, one batch held on the GPU. Each
row adds one change to the one above, in this order:

    before      LRN as PyTorch's LocalResponseNorm on a per-column reshape (a copy of a channels_last
                tensor), torch.optim.SGD (foreach), no cuDNN autotuning, every kernel launched from Python
    +cudnn      torch.backends.cudnn.benchmark (cuDNN times its algorithms once per shape)
    +band LRN   the window sum as a 1x1 convolution with a band matrix (model.GroupedLRN: no reshape copy)
    +fused SGD  optim.PaperSGD: torch's fused SGD kernel, lr on the device
    +graph      step.TrainStep(graph=True): the whole step captured once as a CUDA graph, then replayed
    +split      grouped layers (conv2, conv4, conv5) as one dense convolution per column
    +s2d        conv1 as a 3x3 convolution over 4x4 space-to-depth blocks (48 input channels instead of 3)
    +compile    torch.compile of the network as well (fuses LRN and activations), captured the same way

Images/s are medians of repeats after warm-up (bench._iter_rate); the kernel tables (bench.kernel_table)
are for `before` and for the fastest row. Then, per convolution layer, forward + backward in ms: as a
grouped convolution, split per column, and (conv1) with its 3 input channels padded to 4. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipeline import bench, build  # noqa: E402
from alexnet_pipeline.config import add_arguments, check, from_arguments, option  # noqa: E402
from alexnet_pipeline.distributed import World  # noqa: E402
from alexnet_pipeline.options import Batch, Device, Record, Steps, Timing, resolve_device  # noqa: E402
from alexnet_pipeline.train import TrainConfig  # noqa: E402


class ReshapedLRN(nn.Module):
    """The LRN as it was: PyTorch's LocalResponseNorm applied to each column through a reshape."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups, self.lrn = groups, nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * self.groups, c // self.groups, h, w)).reshape(n, c, h, w)


VARIANTS = ["before", "+cudnn", "+band LRN", "+fused SGD", "+graph", "+split", "+s2d", "+compile"]


def step_for(variant: str, device: torch.device, batch_size: int, width: float = 1.0):
    """The training step as alexnet-train builds it (build.build_parts), taken back to `variant`'s form."""
    level = VARIANTS.index(variant)
    cfg = TrainConfig(shards=Path("unused"), out=Path("unused"), global_batch=batch_size, compile=level >= 7,
                      cuda_graph=level >= 4, width=width)

    def earlier_form(net):
        if level < 2:
            net.lrn1, net.lrn2 = ReshapedLRN(), ReshapedLRN()
        net.split_groups = level >= 5
        net.space_to_depth = level >= 6

    parts = build.build_parts(cfg, 1000, World(0, 1, 0, device), adapt=earlier_form)
    torch.backends.cudnn.benchmark = level >= 1  # place() turned cuDNN autotuning on
    if level < 3:  # torch's own SGD (foreach), before the fused kernel; the eager step only needs step()
        parts.step.optimizer = torch.optim.SGD(parts.net.parameters(), lr=cfg.lr or 0.01, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay)
    return parts.step


def _ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def layer_table(batch: int, device) -> dict:
    """Forward + backward ms of each convolution layer alone (bf16 autocast, channels_last), per variant."""
    layers = [("conv1", 3, 96, 11, 4, 0, 1, 227), ("conv2", 96, 256, 5, 1, 2, 2, 27),
              ("conv3", 256, 384, 3, 1, 1, 1, 13), ("conv4", 384, 384, 3, 1, 1, 2, 13),
              ("conv5", 384, 256, 3, 1, 1, 2, 13)]
    out = {}
    for name, *shape in layers:
        out[name] = _layer_row(device, batch, *shape)
        print(f"{name:<7}" + "".join(f"{k} {v:6.3f} ms  " for k, v in out[name].items()), flush=True)
    return out


def _layer_row(device, batch: int, cin: int, cout: int, k: int, stride: int, pad: int, groups: int,
               size: int) -> dict:
    """One layer's forward + backward ms: native, split per column (grouped layers), channels padded to 4
    (conv1)."""
    from torch.nn import functional as F

    conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups).to(device)
    conv = conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a run-time kwarg the stubs lack
    x = torch.randn(batch, cin, size, size, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_(cin != 3)

    def fwd_bwd(f):
        with torch.autocast("cuda", torch.bfloat16):
            y = f()
        y.float().sum().backward()

    def split():
        parts = zip(x.chunk(groups, 1), conv.weight.chunk(groups, 0), conv.bias.chunk(groups, 0), strict=True)
        return torch.cat([F.conv2d(a, w, b, stride, pad) for a, w, b in parts], 1)

    row = {"native": _ms(lambda: fwd_bwd(lambda: conv(x)))}
    if groups > 1:
        row["split"] = _ms(lambda: fwd_bwd(split))
    if cin == 3:
        x4 = torch.cat([x, torch.zeros_like(x[:, :1])], 1).contiguous(memory_format=torch.channels_last)
        w4 = torch.cat([conv.weight.detach(), torch.zeros_like(conv.weight[:, :1])], 1)
        w4 = w4.contiguous(memory_format=torch.channels_last).requires_grad_()
        row["pad4"] = _ms(lambda: fwd_bwd(lambda: F.conv2d(x4, w4, conv.bias, stride, pad)))
    return row


def evaluation(step, images) -> None:
    """The step's network (compiled, if the variant compiles) once in evaluation mode, as alexnet-train's
    validation runs it: in inference mode, under the step's autocast, dropout off."""
    from alexnet_pipeline.step import autocast

    model = step.model
    model.eval()
    with torch.inference_mode(), autocast(images.device, step.precision):
        model(images)
    model.train()


@dataclass(kw_only=True)
class ProfileConfig(Device, Batch, Timing, Steps, Record):
    """The step profile's options: the shared groups (device, batch, repeats, steps, record), and its own."""

    variants: tuple[str, ...] = option(tuple(VARIANTS), "rows to time, in order", choices=tuple(VARIANTS))
    width: float = option(1.0, "channel multiplier (the CPU dry run of the GPU round)", minimum=1e-3)
    layers: bool = option(True, "also the per-layer table (GPU)")
    eval_graph: bool = option(False, "also run the last variant's network once in evaluation mode, so that its "
                              "graph joins torch.compile's cache too (for alexnet-train's validation)")

    def __post_init__(self):
        check(self)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p, ProfileConfig)
    a = from_arguments(ProfileConfig, p.parse_args(argv))
    device = resolve_device(a.device)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    images = (torch.randn(a.batch_size, 3, 224, 224, device=device) * 60).to(torch.bfloat16 if gpu else torch.float32)
    images = images.contiguous(memory_format=torch.channels_last if gpu else torch.contiguous_format)
    labels = torch.randint(0, 1000, (a.batch_size,), device=device)
    rows: dict[str, float] = {}
    tables: dict[str, dict] = {}
    result = {"batch_size": a.batch_size, "width": a.width, "images_per_s": rows, "kernels": {},
              "gpu": torch.cuda.get_device_name() if gpu else "none", "torch": torch.__version__}
    for variant in a.variants:
        step = step_for(variant, device, a.batch_size, a.width)

        def run(step=step):
            for _ in range(a.steps):
                step(images, labels)
            return a.steps * a.batch_size

        rows[variant] = bench._iter_rate(run, a.repeats, 1, sync)
        print(f"{variant:<12}{rows[variant]:>10.0f} images/s", flush=True)
        if gpu and (variant == "before" or rows[variant] == max(rows.values())):
            tables[variant] = bench.kernel_table(run, a.steps)
        if a.eval_graph and variant == a.variants[-1]:
            evaluation(step, images)
        del step
        if gpu:
            torch.cuda.empty_cache()
        if a.record:  # a run cut short keeps its rows
            a.record.write_text(json.dumps(result, indent=1))
    best = max(rows, key=lambda k: rows[k])
    result["kernels"] = {k: tables[k] for k in ("before", best) if k in tables}
    if a.layers and gpu:
        torch.backends.cudnn.benchmark = True
        print("\nper layer, forward + backward (bf16, channels_last, cuDNN autotuned):")
        result["layers_ms"] = layer_table(a.batch_size, device)
    for name, table in result["kernels"].items():
        print(f"\n{name}: {table['device_ms_per_step']:.2f} ms of kernels per step "
              f"({rows[name]:,.0f} images/s = {a.batch_size / rows[name] * 1e3:.2f} ms per step)")
        for row in table["top"]:
            print(f"  {row['ms_per_step']:7.3f} ms {row['share']:6.1%} {row['calls_per_step']:5.1f}x  {row['kernel']}")
    if a.record:
        a.record.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
