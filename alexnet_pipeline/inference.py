"""A trained network, used: load it from its checkpoint, classify image files, bytes or PIL images.

    import alexnet_pipeline as ap
    model = ap.load_model("run/best.pt")                 # eval mode, with its classes and preprocessing
    for top in ap.predict(model, ["cat.jpg", "dog.png"], tencrop=True, top=5):
        print(top[0].wnid, top[0].name, top[0].probability)

The preprocessing is the paper's evaluation, as alexnet-prep and alexnet-eval apply it: short side resized
to 256 (Lanczos), the central 256x256, then the center 224 crop (or the ten crops, softmax averaged), minus
the mean the network was trained with (the mean image's center patch, or the per-channel mean).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import augment
from .checkpoint import Checkpoint
from .config import check, option
from .image import BadImage, center_square, decode_rgb, rgb
from .options import Device, Output, TenCrop, Weights, resolve_device
from .step import autocast

SIZE = 256


@dataclass
class TrainedModel:
    """A trained AlexNet ready to classify: the network in eval mode on `device`, its classes (sorted wnids,
    the order of its outputs), their names, the mean to subtract and the precision it was trained in."""

    net: torch.nn.Module
    classes: list[str]
    names: dict[str, str]
    mean: np.ndarray  # (3,) or (224, 224, 3), 0-255 RGB
    device: torch.device
    precision: str
    checkpoint: Checkpoint


@dataclass(frozen=True)
class Prediction:
    wnid: str
    name: str
    probability: float
    index: int


def load_model(checkpoint_path, device: str = "auto") -> TrainedModel:
    """The network a checkpoint holds (best.pt or checkpoint.pt), in eval mode on `device` ("auto": the GPU if
    there is one), with its classes and its preprocessing. A file alexnet-train did not write is a UserError
    naming it."""
    return trained_model(Checkpoint.load(checkpoint_path), resolve_device(device))


def trained_model(ckpt: Checkpoint, device: torch.device) -> TrainedModel:
    return TrainedModel(ckpt.network(device), ckpt.classes, ckpt.class_names, ckpt.mean_to_subtract(), device,
                        ckpt.config["precision"], ckpt)


def image_256(image) -> np.ndarray:
    """A file path, bytes or a PIL image as the paper's 256x256 RGB uint8 array (short side 256, center).
    Files and bytes are decoded as alexnet-prep decodes them (a large JPEG first shrinks in the DCT domain);
    a PIL image is taken as it was decoded."""
    if isinstance(image, Image.Image):
        im = rgb(image)
    else:
        data = image if isinstance(image, (bytes, bytearray)) else _read(image)
        im = decode_rgb(bytes(data), SIZE)
    return np.asarray(center_square(im, SIZE))


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror})") from None


def views(pixels: np.ndarray, mean: np.ndarray, tencrop: bool) -> np.ndarray:
    """The network's input for one 256x256 image: [1 or 10, 3, 224, 224] float32, mean subtracted."""
    return augment.ten_crop(pixels, mean) if tencrop else augment.augment(pixels, 16, 16, False, mean)[None]


def probabilities(model: TrainedModel, batch: np.ndarray) -> torch.Tensor:
    """Softmax over the classes of [B, V, 3, 224, 224] views, averaged over the V views: [B, classes]."""
    x = torch.from_numpy(batch).flatten(0, 1).to(model.device)
    if model.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # the layout place() gave the network
    with torch.inference_mode(), autocast(model.device, model.precision):
        logits = model.net(x)
    return logits.float().softmax(1).view(batch.shape[0], batch.shape[1], -1).mean(1).cpu()


def predict(model: TrainedModel, images, tencrop: bool = False, top: int = 5, batch_size: int = 64) \
        -> list[list[Prediction]]:
    """The `top` most likely classes of each image (paths, bytes or PIL images), most likely first. An image
    that cannot be decoded raises image.BadImage (a ValueError) whose message says why."""
    return predict_pixels(model, [image_256(im) for im in images], tencrop, top, batch_size)


def predict_pixels(model: TrainedModel, pixels: list[np.ndarray], tencrop: bool = False, top: int = 5,
                   batch_size: int = 64) -> list[list[Prediction]]:
    """predict() of images already at 256x256 (image_256)."""
    k = min(top, len(model.classes))
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = np.stack([views(p, model.mean, tencrop) for p in pixels[start:start + batch_size]])
        probs = probabilities(model, batch)
        values, indices = probs.topk(k, 1)
        for v, i in zip(values.tolist(), indices.tolist(), strict=True):
            out.append([Prediction(model.classes[c], model.names.get(model.classes[c], model.classes[c]), p, c)
                        for p, c in zip(v, i, strict=True)])
    return out


@dataclass(kw_only=True)
class PredictConfig(Weights, Device, TenCrop, Output):
    """Options of alexnet-predict."""

    images: tuple[str, ...] = option(dataclasses.MISSING, "image files to classify", cli=False)
    top: int = option(5, "classes to show per image", minimum=1)

    def __post_init__(self):
        self.checkpoint, self.images = Path(self.checkpoint), tuple(self.images)
        check(self)


def run(cfg: PredictConfig) -> int:
    """Classify cfg.images and print the results; an unreadable image is one line on stderr naming it, the
    others are still classified. Returns the exit status: 2 if any image could not be read."""
    model = load_model(cfg.checkpoint, cfg.device)
    good, failed = [], 0
    for path in cfg.images:
        try:
            good.append((path, image_256(path)))
        except BadImage as e:
            print(f"alexnet-predict: {path}: {e}", file=sys.stderr)
            failed += 1
    predictions = predict_pixels(model, [p for _, p in good], cfg.tencrop, cfg.top)
    results = zip([path for path, _ in good], predictions, strict=True)
    if cfg.json:
        print(json.dumps([{"image": path, "top": [dataclasses.asdict(p) for p in preds]} for path, preds in results],
                         indent=1))
    else:
        for path, preds in results:
            print(path)
            for p in preds:
                print(f"  {p.probability:7.2%}  {p.wnid}  {p.name}")
    return 2 if failed else 0
