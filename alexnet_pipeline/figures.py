"""The paper's pictures of a trained network.

Figure 3: conv1's kernels, each normalised for display, the first column's kernels in the top block and the
second column's below (the paper's two GPUs). Figure 4: validation images with their top-5 predictions
(the true class marked), and validation images beside the training images whose last hidden layer (fc7,
4,096 numbers at full width) is nearest in Euclidean distance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TILES_PER_ROW = 16
SCALE, GAP, BLOCK_GAP = 4, 2, 8  # pixels per kernel weight, between tiles, between the two columns' blocks
BACKGROUND = 255


def normalised_kernels(weight: torch.Tensor) -> np.ndarray:
    """conv1's kernels [n, 3, k, k] as display images [n, k, k, 3] in 0-1: each kernel scaled on its own
    from its minimum to its maximum (a constant kernel is mid grey)."""
    w = weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (w - lo) / span, 0.5)


def tile_origins(n: int, k: int) -> list[tuple[int, int]]:
    """(top, left) pixel of each of `n` kernel tiles of side k*SCALE: two blocks (the two columns) of n/2
    kernels, TILES_PER_ROW to a row."""
    half, side = n // 2, k * SCALE
    rows = -(-half // TILES_PER_ROW)
    block_h = rows * (side + GAP) - GAP
    out = []
    for i in range(n):
        block, j = divmod(i, half) if half else (0, i)
        r, c = divmod(j, TILES_PER_ROW)
        out.append((GAP + block * (block_h + BLOCK_GAP) + r * (side + GAP), GAP + c * (side + GAP)))
    return out


def filters_mosaic(weight: torch.Tensor) -> np.ndarray:
    """The Figure 3 image (uint8 RGB): every kernel enlarged SCALE times, on a white background."""
    kernels = normalised_kernels(weight)
    n, k = kernels.shape[0], kernels.shape[1]
    origins = tile_origins(n, k)
    side = k * SCALE
    height = max(t for t, _ in origins) + side + GAP
    width = min(n // 2 or n, TILES_PER_ROW) * (side + GAP) + GAP
    mosaic = np.full((height, width, 3), BACKGROUND, np.uint8)
    for kernel, (top, left) in zip(kernels, origins):
        tile = np.round(kernel * 255).astype(np.uint8).repeat(SCALE, 0).repeat(SCALE, 1)
        mosaic[top:top + side, left:left + side] = tile
    return mosaic


def filters_figure(weight: torch.Tensor, path: Path) -> Path:
    """RUN/filters.png: Figure 3 of the paper from conv1's weights [n, 3, 11, 11] (grouped layout: the first
    n/2 kernels are the first column's)."""
    Image.fromarray(filters_mosaic(weight)).save(path)
    return Path(path)
