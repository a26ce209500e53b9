"""AlexNet as in Krizhevsky, Sutskever & Hinton (2012), and torchvision's single-column variant.

Imports only torch. The paper's two GPU columns are grouped convolutions: conv2, conv4 and conv5 see only
their own column (groups=2); conv3 and the fully connected layers see both. Local response normalisation
follows ReLU on conv1 and conv2 and, as on the two GPUs, never crosses the columns (applied per group).

TwoColumnAlexNet is the same function laid out as on the paper's two GPUs: each column's layers on its own
device, exchanging activations only where the paper's columns communicated (into conv3, fc6, fc7 and fc8).

conv1: the paper's 224 input gives 55x55 only with padding. We pad right and bottom by 3 with zeros
(cuda-convnet2 rounds its output size up, which is the same); Caffe instead crops 227 real pixels, and
torchvision's variant pads 2 on every side.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("paper", "caffe")


@dataclass
class AlexNetConfig:
    """variant: "paper" (96-256-384-384-256, two columns, LRN) or "torchvision" (64-192-384-256-256, one
    column, no LRN, PyTorch's default init). width scales every layer's channels and hidden units (for
    quick CPU runs). init (paper variant): "paper" (weights N(0, 0.01), biases 1 on conv2, conv4, conv5, fc6,
    fc7) or "caffe" (bvlc_alexnet: biases 0.1 there, std 0.005 on fc6 and fc7)."""

    num_classes: int = 1000
    variant: str = "paper"
    width: float = 1.0
    dropout: float = 0.5
    init: str = "paper"


class GroupedLRN(nn.Module):
    """Local response normalisation across channels, within each column: PyTorch's LocalResponseNorm (alpha
    divided by size, as cuda-convnet2 and Caffe) applied to each group of channels on its own.

    The sum of squares over each channel's window is a 1x1 convolution with a band matrix that is zero
    across the column boundary. That keeps the tensor's layout (a per-column reshape of a channels_last
    tensor would copy it) and runs on the GPU's matrix units."""

    def __init__(self, channels: int, groups: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 2.0):
        super().__init__()
        self.channels, self.size, self.alpha, self.beta, self.k = channels, size, alpha, beta, k
        c = torch.arange(channels)
        near = (c[:, None] - c[None, :]).abs() <= size // 2
        same_column = (c[:, None] * groups // channels) == (c[None, :] * groups // channels)
        # ones, exact in any precision (alpha/size in bfloat16 would be off by up to 0.2%)
        self.register_buffer("band", (near & same_column).float()[:, :, None, None], persistent=False)

    def forward(self, x):
        window_sum = F.conv2d(x * x, self.band.to(x.dtype))
        # in place: neither the convolution's nor the scaling's backward needs these values
        return x * window_sum.mul_(self.alpha / self.size).add_(self.k).pow(-self.beta)


class AlexNet(nn.Module):
    def __init__(self, cfg: AlexNetConfig | None = None):
        super().__init__()
        cfg = cfg or AlexNetConfig()
        if cfg.variant not in ("paper", "torchvision"):
            raise ValueError(f"variant must be 'paper' or 'torchvision', got {cfg.variant!r}")
        if cfg.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
        self.cfg = cfg
        paper = cfg.variant == "paper"
        g = 2 if paper else 1

        def ch(n):  # channel counts stay divisible by the number of columns
            return max(g, int(round(n * cfg.width / g)) * g)

        c = [ch(n) for n in ((96, 256, 384, 384, 256) if paper else (64, 192, 384, 256, 256))]
        hidden = ch(4096)
        self.pad1 = (0, 3, 0, 3) if paper else (2, 2, 2, 2)
        self.conv1 = nn.Conv2d(3, c[0], 11, stride=4)
        self.conv2 = nn.Conv2d(c[0], c[1], 5, padding=2, groups=g)
        self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv4 = nn.Conv2d(c[2], c[3], 3, padding=1, groups=g)
        self.conv5 = nn.Conv2d(c[3], c[4], 3, padding=1, groups=g)
        self.lrn1 = GroupedLRN(c[0], g) if paper else nn.Identity()
        self.lrn2 = GroupedLRN(c[1], g) if paper else nn.Identity()
        self.fc6 = nn.Linear(c[4] * 6 * 6, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, cfg.num_classes)
        self.drop = nn.Dropout(cfg.dropout)
        if paper:
            self._paper_init()

    def _paper_init(self):
        """Weights N(0, 0.01); biases 1 on conv2, conv4, conv5, fc6, fc7 (ReLUs start active), else 0. With
        init="caffe" (bvlc_alexnet), those biases are 0.1 and fc6/fc7 use std 0.005. At width w < 1 every layer
        after conv1 has w times the fan-in, so its std is divided by sqrt(w): each layer then scales the signal
        as in the full network (a fixed 0.01 makes narrow networks stall at ln(classes))."""
        caffe = self.cfg.init == "caffe"
        for name, m in self.named_children():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = 0.005 if caffe and name in ("fc6", "fc7") else 0.01
                nn.init.normal_(m.weight, 0.0, std / (1 if name == "conv1" else math.sqrt(self.cfg.width)))
                ones = name in ("conv2", "conv4", "conv5", "fc6", "fc7")
                nn.init.constant_(m.bias, (0.1 if caffe else 1.0) if ones else 0.0)

    # Two ways to compute the same function with the same weights, set by place() on GPUs (docs/results.md,
    # "Where a step's time goes"): grouped layers as one dense convolution per column (cuDNN's weight gradient of a
    # grouped convolution in channels_last falls back to a slow kernel), and conv1 over space-to-depth blocks
    # (3 input channels leave the matrix units idle; 48 do not).
    split_groups = False
    space_to_depth = False

    def _conv1(self, x):
        """conv1 (11x11, stride 4) on the padded input. With space_to_depth: the kernel gets a 12th row and
        column of zeros, input and kernel are cut into 4x4 blocks moved into channels, and a 3x3 stride-1
        convolution over the blocks gives exactly the same sums."""
        x = F.pad(x, self.pad1)
        if not self.space_to_depth:
            return self.conv1(x)
        n, c, h, w = x.shape
        out_h, out_w = (h - 11) // 4 + 1, (w - 11) // 4 + 1
        bh, bw = -(-(h + 1) // 4), -(-(w + 1) // 4)  # blocks covering every 12x12 window
        x = F.pad(x, (0, 4 * bw - w, 0, 4 * bh - h))
        blocks = x.permute(0, 2, 3, 1).reshape(n, bh, 4, bw, 4, c).permute(0, 1, 3, 5, 2, 4)
        blocks = blocks.reshape(n, bh, bw, c * 16).permute(0, 3, 1, 2)  # channels_last in memory
        weight = F.pad(self.conv1.weight, (0, 1, 0, 1)).reshape(-1, c, 3, 4, 3, 4).permute(0, 1, 3, 5, 2, 4)
        out = F.conv2d(blocks, weight.reshape(-1, c * 16, 3, 3), self.conv1.bias)
        return out[:, :, :out_h, :out_w]

    def _conv(self, conv: nn.Conv2d, x):
        if not self.split_groups or conv.groups == 1:
            return conv(x)
        g = conv.groups
        assert conv.bias is not None  # every AlexNet layer has one
        parts = zip(x.chunk(g, 1), conv.weight.chunk(g, 0), conv.bias.chunk(g, 0), strict=True)
        return torch.cat([F.conv2d(xi, w, b, conv.stride, conv.padding) for xi, w, b in parts], 1)

    def features(self, x):
        x = F.max_pool2d(self.lrn1(F.relu(self._conv1(x))), 3, 2)
        x = F.max_pool2d(self.lrn2(F.relu(self._conv(self.conv2, x))), 3, 2)
        x = F.relu(self._conv(self.conv5, F.relu(self._conv(self.conv4, F.relu(self.conv3(x))))))
        return F.max_pool2d(x, 3, 2)

    def hidden(self, x):
        """fc7's output after its ReLU: the last hidden layer, whose nearest neighbours are Figure 4's."""
        x = self.features(x)
        if self.cfg.variant == "paper":  # dropout on the outputs of fc6 and fc7
            x = self.drop(F.relu(self.fc6(torch.flatten(x, 1))))
            return F.relu(self.fc7(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 6), 1)  # torchvision: dropout on the inputs of fc6, fc7
        x = F.relu(self.fc6(self.drop(x)))
        return F.relu(self.fc7(self.drop(x)))

    def forward(self, x):
        h = self.hidden(x)
        return self.fc8(self.drop(h) if self.cfg.variant == "paper" else h)


class _Column(nn.Module):
    """One of the paper's two columns: half of every layer's outputs (fc8 lives on the first device)."""

    def __init__(self, net: AlexNet, i: int):
        super().__init__()

        def half(layer, full_input: bool):  # this column's rows of `layer`
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            rows = slice(i * out // 2, (i + 1) * out // 2)
            new: nn.Linear | nn.Conv2d
            if isinstance(layer, nn.Linear):
                new = nn.Linear(layer.in_features, out // 2, dtype=layer.weight.dtype)
            else:
                new = nn.Conv2d(layer.in_channels if full_input else layer.in_channels // 2, out // 2,
                                layer.kernel_size, layer.stride, layer.padding, dtype=layer.weight.dtype)
            assert new.bias is not None and layer.bias is not None  # every AlexNet layer has one
            with torch.no_grad():
                new.weight.copy_(layer.weight[rows])
                new.bias.copy_(layer.bias[rows])
            return new

        self.conv1, self.conv2, self.conv3 = half(net.conv1, True), half(net.conv2, False), half(net.conv3, True)
        self.conv4, self.conv5 = half(net.conv4, False), half(net.conv5, False)
        self.fc6, self.fc7 = half(net.fc6, True), half(net.fc7, True)
        # the grouped model's LRN settings, for this column's channels alone
        grouped = [typing.cast(GroupedLRN, lrn) for lrn in (net.lrn1, net.lrn2)]  # the paper variant has LRN
        self.lrn1, self.lrn2 = (GroupedLRN(lrn.channels // 2, 1, lrn.size, lrn.alpha, lrn.beta, lrn.k)
                                for lrn in grouped)
        self.pad1 = net.pad1

    def bottom(self, x):  # conv1, conv2: only this column's maps
        x = F.max_pool2d(self.lrn1(F.relu(self.conv1(F.pad(x, self.pad1)))), 3, 2)
        return F.max_pool2d(self.lrn2(F.relu(self.conv2(x))), 3, 2)

    def top(self, x):  # conv3 sees both columns; conv4, conv5 only this one
        x = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x))))))
        return torch.flatten(F.max_pool2d(x, 3, 2), 1)


class TwoColumnAlexNet(nn.Module):
    """The paper's AlexNet with column i on devices[i], built from (and equal to) a grouped paper AlexNet.

    Activations cross devices only into conv3, fc6, fc7 and fc8, as in the paper. `grouped_state_dict()` gives
    the weights in AlexNet's layout, so checkpoints and evaluation do not depend on the layout trained in.
    """

    def __init__(self, net: AlexNet, devices=("cuda:0", "cuda:1")):
        super().__init__()
        if net.cfg.variant != "paper":
            raise ValueError("model parallelism splits the paper's two columns; the torchvision variant has one")
        self.cfg, self.devices = net.cfg, [torch.device(d) for d in devices]
        self.columns = nn.ModuleList(_Column(net, i).to(d) for i, d in enumerate(self.devices))
        self.fc8 = nn.Linear(net.fc8.in_features, net.fc8.out_features).to(self.devices[0], net.fc8.weight.dtype)
        self.fc8.load_state_dict(net.fc8.state_dict())
        self.drop = nn.Dropout(net.cfg.dropout)

    def _exchange(self, parts):
        """Each device gets every column's output (the paper's cross-GPU connections)."""
        return [torch.cat([p.to(d) for p in parts], 1) for d in self.devices]

    def forward(self, x):
        cols = self.columns
        a = [c.bottom(x.to(d)) for c, d in zip(cols, self.devices, strict=True)]
        h = [c.top(a_) for c, a_ in zip(cols, self._exchange(a), strict=True)]
        h = [self.drop(F.relu(c.fc6(h_))) for c, h_ in zip(cols, self._exchange(h), strict=True)]
        h = [self.drop(F.relu(c.fc7(h_))) for c, h_ in zip(cols, self._exchange(h), strict=True)]
        return self.fc8(torch.cat([h_.to(self.devices[0]) for h_ in h], 1))

    def grouped_state_dict(self) -> dict:
        """The weights as AlexNet.state_dict() would hold them (on the CPU)."""
        out = {}
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = torch.cat([getattr(c, name).state_dict()[kind].cpu() for c in self.columns])
        out.update({f"fc8.{k}": v.cpu() for k, v in self.fc8.state_dict().items()})
        return out


def place(net: AlexNet, device: torch.device, model_parallel: bool = False, columns=None):
    """The network as it runs: on `device`, or split over two devices as the paper's columns (`columns`, by
    default this device and the next GPU); channels_last on GPUs, where cuDNN's convolutions are fastest in
    that layout."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its algorithms once per shape
    placed: nn.Module
    if not model_parallel:
        placed = net.to(device)
        net.split_groups = net.space_to_depth = device.type == "cuda"
    elif columns is not None:
        placed = TwoColumnAlexNet(net, tuple(torch.device(c) for c in columns))
    elif device.type == "cuda":
        placed = TwoColumnAlexNet(net, (device, torch.device("cuda", (device.index or 0) + 1)))
    else:
        placed = TwoColumnAlexNet(net, (device, device))  # two CPU "devices": for tests and CPU-only machines
    if device.type == "cuda":
        placed = placed.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a run-time kwarg the stubs lack
    return placed


def flops_per_image(cfg: AlexNetConfig, size: int = 224) -> dict:
    """Multiply-accumulates of one 224x224 image through the network (convolutions and fully connected
    layers; LRN, pooling and activations are left out, the usual convention), and the FLOPs of a training
    step per image: 2 per MAC, forward plus backward (gradients of inputs and of weights) = 3 x forward."""
    net = AlexNet(cfg)
    macs, hook_handles = [], []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * per_output)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hook_handles.append(m.register_forward_hook(count))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, size, size))
    for h in hook_handles:
        h.remove()
    forward = sum(macs)
    return {"forward_macs": forward, "train_flops": 3 * 2 * forward}
