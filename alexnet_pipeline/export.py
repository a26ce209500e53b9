"""alexnet-export: a trained network for other tools.

    --out model.onnx   ONNX (opset 18). Input "images": N x 3 x 224 x 224, either float32 RGB in 0-255 with the
                       training mean already subtracted (--input float, the default), or uint8 RGB crops with
                       the mean subtraction inside the graph (--input uint8). Output "logits": N x classes, in
                       the checkpoint's class order (sorted wnids; see RUN/config.json or dataset.json).
    --out model.pt     a state_dict that torchvision.models.alexnet(num_classes=...) loads, for networks of
                       torchvision's layout (--variant torchvision, width 1); the paper's two-column AlexNet
                       has no torchvision counterpart and is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import UserError, check, option
from .files import atomic_write, write_error
from .options import Weights

# our layer -> torchvision.models.AlexNet's (features / classifier are nn.Sequential)
TORCHVISION_NAMES = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                     "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
OPSET = 18


@dataclass(kw_only=True)
class ExportConfig(Weights):
    """Options of alexnet-export."""

    out: Path = option(dataclasses.MISSING, "model.onnx (ONNX) or model.pt (a torchvision state_dict)")
    input: str = option("float", "ONNX input: float = mean-subtracted float32; uint8 = RGB crops, the mean "
                        "subtracted inside the graph", choices=("float", "uint8"))

    def __post_init__(self):
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        check(self)
        if self.out.suffix not in (".onnx", ".pt"):
            raise UserError(f"option out: {self.out} must end in .onnx (ONNX) or .pt (a torchvision state_dict)")


class WithMean(torch.nn.Module):
    """The network behind its preprocessing: uint8 RGB crops in, logits out."""

    def __init__(self, net: torch.nn.Module, mean: np.ndarray):
        super().__init__()
        self.net = net
        m = torch.as_tensor(np.asarray(mean, np.float32))
        self.register_buffer("mean", m.permute(2, 0, 1)[None] if m.dim() == 3 else m.view(1, 3, 1, 1))

    def forward(self, images):
        return self.net(images.float() - self.mean)


def onnx_bytes(ckpt: Checkpoint, uint8_input: bool = False) -> bytes:
    """The checkpoint's network as an ONNX model with a dynamic batch dimension."""
    net = ckpt.network("cpu")
    model = WithMean(net, ckpt.mean_to_subtract()).eval() if uint8_input else net
    example = torch.zeros(2, 3, 224, 224, dtype=torch.uint8 if uint8_input else torch.float32)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter's notes about absent torchvision ops
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its progress lines, deprecations
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                    dynamo=True, verbose=False)
    if program is None:  # dynamo=True always gives a program; None is the legacy exporter's
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto.SerializeToString()


def torchvision_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights under torchvision.models.AlexNet's names, where the layouts agree."""
    cfg = ckpt.model_config
    if cfg["variant"] != "torchvision" or cfg["width"] != 1.0:
        raise UserError(f"{ckpt.path}: a {cfg['variant']} AlexNet of width {cfg['width']}; torchvision's "
                        "alexnet() is the one-column, no-LRN network of width 1 (train with --variant "
                        "torchvision); export this one as ONNX (--out model.onnx)")
    out = {}
    for ours, theirs in TORCHVISION_NAMES.items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = ckpt.weights[f"{ours}.{kind}"].clone()
    return out


def run(cfg: ExportConfig) -> Path:
    ckpt = Checkpoint.load(cfg.checkpoint)
    write: Callable[[BinaryIO], None] | bytes
    if cfg.out.suffix == ".pt":
        state = torchvision_state_dict(ckpt)

        def write(f: BinaryIO) -> None:
            torch.save(state, f)
    else:
        write = onnx_bytes(ckpt, cfg.input == "uint8")
    try:
        atomic_write(cfg.out, write)
    except OSError as e:
        raise (write_error(cfg.out, e) or e) from None
    return cfg.out
