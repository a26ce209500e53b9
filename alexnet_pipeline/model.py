"""AlexNet as in Krizhevsky, Sutskever & Hinton (2012), and torchvision's single-column variant.

Imports only torch. The paper's two GPU columns are grouped convolutions: conv2, conv4 and conv5 see only
their own column (groups=2); conv3 and the fully connected layers see both. Local response normalisation
follows ReLU on conv1 and conv2 and, as on the two GPUs, never crosses the columns (applied per group).

TwoColumnAlexNet is the same function laid out as on the paper's two GPUs: each column's layers on its own
device, exchanging activations only where the paper's columns communicated (into conv3, fc6, fc7 and fc8).

conv1: the paper's 224 input gives 55x55 only with padding. We pad right and bottom by 3 (cuda-convnet2's
choice, the same as feeding a 227 crop); torchvision's variant pads 2 on every side instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class AlexNetConfig:
    """variant: "paper" (96-256-384-384-256, two columns, LRN) or "torchvision" (64-192-384-256-256, one
    column, no LRN, PyTorch's default init). width scales every layer's channels and hidden units (for
    quick CPU runs)."""

    num_classes: int = 1000
    variant: str = "paper"
    width: float = 1.0
    dropout: float = 0.5


class GroupedLRN(nn.Module):
    """PyTorch's LocalResponseNorm (alpha divided by size, as cuda-convnet2 and Caffe) within each column."""

    def __init__(self, groups: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        self.groups, self.lrn = groups, nn.LocalResponseNorm(size, alpha, beta, k)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * self.groups, c // self.groups, h, w)).reshape(n, c, h, w)


class AlexNet(nn.Module):
    def __init__(self, cfg: AlexNetConfig = AlexNetConfig()):
        super().__init__()
        if cfg.variant not in ("paper", "torchvision"):
            raise ValueError(f"variant must be 'paper' or 'torchvision', got {cfg.variant!r}")
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
        self.lrn1 = GroupedLRN(g) if paper else nn.Identity()
        self.lrn2 = GroupedLRN(g) if paper else nn.Identity()
        self.fc6 = nn.Linear(c[4] * 6 * 6, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, cfg.num_classes)
        self.drop = nn.Dropout(cfg.dropout)
        if paper:
            self._paper_init()

    def _paper_init(self):
        """Weights N(0, 0.01); biases 1 on conv2, conv4, conv5, fc6, fc7 (ReLUs start active), else 0.
        At width w < 1 every layer after conv1 has w times the fan-in, so its std is 0.01 / sqrt(w): each layer
        then scales the signal as in the full network (a fixed 0.01 makes narrow networks stall at ln(classes))."""
        for name, m in self.named_children():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01 / (1 if name == "conv1" else math.sqrt(self.cfg.width)))
                nn.init.constant_(m.bias, 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0)

    def features(self, x):
        x = F.max_pool2d(self.lrn1(F.relu(self.conv1(F.pad(x, self.pad1)))), 3, 2)
        x = F.max_pool2d(self.lrn2(F.relu(self.conv2(x))), 3, 2)
        x = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x))))))
        return F.max_pool2d(x, 3, 2)

    def forward(self, x):
        x = self.features(x)
        if self.cfg.variant == "paper":  # dropout on the outputs of fc6 and fc7
            x = self.drop(F.relu(self.fc6(torch.flatten(x, 1))))
            return self.fc8(self.drop(F.relu(self.fc7(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 6), 1)  # torchvision: dropout on the inputs of fc6, fc7
        x = F.relu(self.fc6(self.drop(x)))
        return self.fc8(F.relu(self.fc7(self.drop(x))))


class _Column(nn.Module):
    """One of the paper's two columns: half of every layer's outputs (fc8 lives on the first device)."""

    def __init__(self, net: AlexNet, i: int):
        super().__init__()

        def half(layer, full_input: bool):  # this column's rows of `layer`
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            rows = slice(i * out // 2, (i + 1) * out // 2)
            if isinstance(layer, nn.Linear):
                new = nn.Linear(layer.in_features, out // 2, dtype=layer.weight.dtype)
            else:
                new = nn.Conv2d(layer.in_channels if full_input else layer.in_channels // 2, out // 2,
                                layer.kernel_size, layer.stride, layer.padding, dtype=layer.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(layer.weight[rows])
                new.bias.copy_(layer.bias[rows])
            return new

        self.conv1, self.conv2, self.conv3 = half(net.conv1, True), half(net.conv2, False), half(net.conv3, True)
        self.conv4, self.conv5 = half(net.conv4, False), half(net.conv5, False)
        self.fc6, self.fc7 = half(net.fc6, True), half(net.fc7, True)
        self.lrn, self.pad1 = net.lrn1.lrn, net.pad1  # the grouped model's LRN, applied to this column alone

    def bottom(self, x):  # conv1, conv2: only this column's maps
        x = F.max_pool2d(self.lrn(F.relu(self.conv1(F.pad(x, self.pad1)))), 3, 2)
        return F.max_pool2d(self.lrn(F.relu(self.conv2(x))), 3, 2)

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
        a = [c.bottom(x.to(d)) for c, d in zip(cols, self.devices)]
        h = [c.top(a_) for c, a_ in zip(cols, self._exchange(a))]
        h = [self.drop(F.relu(c.fc6(h_))) for c, h_ in zip(cols, self._exchange(h))]
        h = [self.drop(F.relu(c.fc7(h_))) for c, h_ in zip(cols, self._exchange(h))]
        return self.fc8(torch.cat([h_.to(self.devices[0]) for h_ in h], 1))

    def grouped_state_dict(self) -> dict:
        """The weights as AlexNet.state_dict() would hold them (on the CPU)."""
        out = {}
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = torch.cat([getattr(c, name).state_dict()[kind].cpu() for c in self.columns])
        out.update({f"fc8.{k}": v.cpu() for k, v in self.fc8.state_dict().items()})
        return out


def place(net: AlexNet, device: torch.device, model_parallel: bool = False):
    """The network as it runs: on `device`, or split over this device and the next (the paper's columns);
    channels_last on GPUs, where cuDNN's convolutions are fastest in that layout."""
    if not model_parallel:
        net = net.to(device)
    elif device.type == "cuda":
        net = TwoColumnAlexNet(net, (device, torch.device("cuda", device.index + 1)))
    else:
        net = TwoColumnAlexNet(net, (device, device))  # two CPU "devices": for tests and CPU-only machines
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
