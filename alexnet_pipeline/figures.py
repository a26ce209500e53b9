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

from . import storage

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
    for kernel, (top, left) in zip(kernels, origins, strict=True):
        tile = np.round(kernel * 255).astype(np.uint8).repeat(SCALE, 0).repeat(SCALE, 1)
        mosaic[top:top + side, left:left + side] = tile
    return mosaic


def filters_figure(weight: torch.Tensor, path: Path) -> Path:
    """RUN/filters.png: Figure 3 of the paper from conv1's weights [n, 3, 11, 11] (grouped layout: the first
    n/2 kernels are the first column's)."""
    Image.fromarray(filters_mosaic(weight)).save(path)
    return Path(path)


# ---- Figure 4 --------------------------------------------------------------------------------------------

THUMB = 128  # pixels per image in the neighbours mosaic (the 256x256 images halved)


def nearest(queries: torch.Tensor, bank, k: int = 6) -> torch.Tensor:
    """Indices [q, k] of each query's k nearest rows of `bank` in Euclidean distance, nearest first. `bank` is
    a tensor or an iterable of row chunks, searched one chunk at a time: the memory is a chunk's and k rows
    per query's, whatever the bank's size (the paper searched the whole training set: 1.28M x 4,096)."""
    queries = queries.double()
    best_d = torch.full((len(queries), 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(queries), 0), dtype=torch.int64)
    seen = 0
    for chunk in ([bank] if isinstance(bank, torch.Tensor) else bank):
        d = torch.cdist(queries, chunk.double().to(queries.device))
        idx = torch.arange(seen, seen + len(chunk)).expand(len(queries), -1)
        best_d, best_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        # ties keep the earlier row: a stable sort on distance, then the k first
        order = torch.sort(best_d, dim=1, stable=True).indices[:, :k]
        best_d, best_i = best_d.gather(1, order), best_i.gather(1, order)
        seen += len(chunk)
    return best_i


def hidden_features(net, loader, limit: int, progress: bool = True, precision: str = "fp32"):
    """fc7 activations [b, 4096 x width] of the first `limit` images of a center-crop loader (padding left
    out), batch by batch on the CPU, with a progress bar; `precision` as the network was trained (bf16
    autocast on GPUs)."""
    from tqdm import tqdm

    from .step import autocast

    n = 0
    net.eval()
    with torch.inference_mode(), tqdm(total=limit, desc="fc7 of training images", unit="img",
                                      disable=not progress) as bar:
        for images, labels in loader:
            with autocast(images.device, precision):
                h = net.hidden(images)[labels >= 0].float().cpu()
            h = h[:limit - n]
            n += len(h)
            bar.update(len(h))
            yield h
            if n >= limit:
                break


def _thumb(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def neighbours_mosaic(queries: list[np.ndarray], neighbours: list[list[np.ndarray]]) -> np.ndarray:
    """Figure 4, right: a row per query, the query first, then its neighbours, nearest first; a wider gap
    after the query. uint8 RGB, THUMB pixels per image."""
    per_row = 1 + max(len(n) for n in neighbours)
    width = GAP + per_row * (THUMB + GAP) + BLOCK_GAP
    mosaic = np.full((GAP + len(queries) * (THUMB + GAP), width, 3), BACKGROUND, np.uint8)
    for r, (q, ns) in enumerate(zip(queries, neighbours, strict=True)):
        top = GAP + r * (THUMB + GAP)
        for c, im in enumerate([q, *ns]):
            left = GAP + c * (THUMB + GAP) + (BLOCK_GAP if c else 0)
            mosaic[top:top + THUMB, left:left + THUMB] = _thumb(im)
    return mosaic


def predictions_figure(images: list[np.ndarray], tops, truths: list[str], path: Path) -> Path:
    """Figure 4, left: each image with its top-5 classes as bars, the true class's bar in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.2 * cols, 4.6 * rows),
                             gridspec_kw={"height_ratios": [3, 1.6] * rows}, constrained_layout=True)
    axes = np.atleast_2d(axes)
    for i in range(rows * cols):
        ax_im, ax_bar = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        ax_im.axis("off")
        ax_bar.axis("off")
        if i >= len(images):
            continue
        truth_name = next((p.name for p in tops[i] if p.wnid == truths[i]), truths[i])
        ax_im.imshow(images[i])
        ax_im.set_title(_short(truth_name), fontsize=9)
        names = [_short(p.name) for p in tops[i]][::-1]
        values = [p.probability for p in tops[i]][::-1]
        colours = ["C3" if p.wnid == truths[i] else "C0" for p in tops[i]][::-1]
        ax_bar.axis("on")
        ax_bar.barh(range(len(values)), values, color=colours)
        ax_bar.set_yticks(range(len(values)), names, fontsize=7)
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def _short(name: str) -> str:
    return name.split(",")[0][:24]


def _pick(labels, n: int) -> list[int]:
    """Indices of n samples, one per class first (the first of each), then the next ones in order. `labels`
    is read only as far as needed: up to the n-th new class (one shard of ImageNet's val, not 50,000)."""
    first: dict[int, int] = {}
    taken = []
    for i, label in enumerate(labels):
        taken.append(i)
        first.setdefault(label, i)
        if len(first) == n:
            break
    chosen = sorted(first.values())[:n]
    return chosen + [i for i in taken if i not in chosen][:n - len(chosen)]


def _labels(shards_dir: Path | str, split: str):
    """The labels of a split's samples in shard order, read shard by shard as they are asked for."""
    from .shards import iter_samples, shard_paths

    for path in shard_paths(shards_dir, split):
        yield from (s.label for s in iter_samples(storage.read_bytes(path)))


def _samples(shards_dir: Path | str, split: str, wanted: set[int] | None = None):
    """{index: (pixels 256x256x3, label)} of a split's samples in shard order (all, or the `wanted` ones)."""
    from .inference import image_256
    from .shards import iter_samples, shard_paths

    out, i = {}, 0
    for path in shard_paths(shards_dir, split):
        for s in iter_samples(storage.read_bytes(path)):
            if wanted is None or i in wanted:
                out[i] = (image_256(s.jpeg), s.label)
            i += 1
        if wanted is not None and len(out) == len(wanted):
            break
    return out


def paper_figures(ckpt, shards_dir: Path | str, out_dir: Path, device: torch.device, pool: int, batch_size: int = 128,
                  progress: bool = True) -> dict:
    """filters.png, predictions.png and neighbours.png of a checkpoint into `out_dir`: Figure 3, and Figure 4
    with eight validation images (one per class first) and the first five of them beside their six nearest
    neighbours in fc7 among the first `pool` training images (center crops, in shard order). Returns the
    paths and what they show."""
    from .build import evaluation_loader
    from .distributed import World
    from .inference import predict_pixels, trained_model
    from .shards import load_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    model = trained_model(ckpt, device)
    paths = {"filters": filters_figure(ckpt.weights["conv1.weight"], out_dir / "filters.png")}
    manifest = load_manifest(shards_dir)
    shown = _pick(_labels(shards_dir, "val"), min(8, manifest.splits["val"].samples))
    val = _samples(shards_dir, "val", set(shown))
    tops = predict_pixels(model, [val[i][0] for i in shown])
    truths = [ckpt.classes[val[i][1]] for i in shown]
    paths["predictions"] = predictions_figure([val[i][0] for i in shown], tops, truths, out_dir / "predictions.png")

    def loader(split, samples):  # the first shards holding `samples` only, read in shard order (one stream)
        return evaluation_loader(shards_dir, World(0, 1, 0, device), mean=ckpt.preprocessing["mean"],
                                 precision=model.precision, batch_size=batch_size, split=split, samples=samples,
                                 options={"streams": 1})

    pool = min(pool, manifest.splits["train"].samples)
    queries = shown[:5]
    n_query = max(queries) + 1
    query_features = torch.cat(list(hidden_features(model.net, loader("val", n_query), n_query, False,
                                                    model.precision)))[queries]
    bank = hidden_features(model.net, loader("train", pool), pool, progress, model.precision)
    found = nearest(query_features, bank, 6)
    train_images = _samples(shards_dir, "train", set(found.flatten().tolist()))
    mosaic = neighbours_mosaic([val[i][0] for i in queries],
                               [[train_images[j][0] for j in row] for row in found.tolist()])
    Image.fromarray(mosaic).save(out_dir / "neighbours.png")
    paths["neighbours"] = out_dir / "neighbours.png"
    return {"paths": paths, "shown": shown, "tops": tops, "truths": truths, "queries": queries,
            "neighbours": found.tolist(), "pool": pool}
