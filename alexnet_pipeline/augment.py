"""The paper's augmentation in plain numpy, given its random choices: the oracle for the DALI pipeline and
the transform of the baseline loader (docs/design.md, "The augmentation").

Images are uint8 HxWx3 RGB (256x256 from the shards); outputs are float32 CHW in 0-255 units, mean-subtracted.

Lighting (PCA colour augmentation): add ``eigvec @ (alpha * s)`` to every pixel, ``alpha ~ N(0, sigma)``
drawn per image. The paper says "proportional to the eigenvalues" without fixing the pixel scale, and the two
codes people copy disagree:
- ``"sqrt"`` (default): ``s = sqrt(eigval)``, the authors' cuda-convnet2. ``s`` is then a standard deviation
  in pixel units, so the shift is the same whatever scale the pixels are kept in.
- ``"eigval"``: ``s = eigval / 255`` in 0-255 units, i.e. fb.resnet.torch's eigenvalues of [0,1] pixels.
From one set of eigenvalues they differ by ``sqrt(eigval)/(eigval/255) = 255/sqrt(eigval)``: about 2-13x per
axis on ImageNet.
"""

from __future__ import annotations

import numpy as np

CROP = 224
# Ten-crop order, as (x, y) offsets into a 256x256 image: top-left, top-right, bottom-left, bottom-right,
# center; then the same five mirrored. With 256 -> 224 the offsets are 0, 16 and 32.
FIVE_CROPS = ((0, 0), (32, 0), (0, 32), (32, 32), (16, 16))
TEN_CROPS = tuple((x, y, False) for x, y in FIVE_CROPS) + tuple((x, y, True) for x, y in FIVE_CROPS)
LIGHTING_FORMS = ("sqrt", "eigval")
MEAN_MODES = ("channel", "pixel")


def lighting_scale(eigval: np.ndarray, form: str) -> np.ndarray:
    """Per-axis magnitude `s` of the lighting shift, in 0-255 units."""
    if form == "sqrt":
        return np.sqrt(np.maximum(eigval, 0.0))
    if form == "eigval":
        return np.asarray(eigval) / 255.0
    raise ValueError(f"lighting form must be one of {LIGHTING_FORMS}, got {form!r}")


def lighting_shift(alpha: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray, form: str = "sqrt") -> np.ndarray:
    """The RGB shift added to every pixel of one image: eigvec @ (alpha * s)."""
    return np.asarray(eigvec) @ (np.asarray(alpha) * lighting_scale(eigval, form))


def mean_to_subtract(stats, mode: str) -> np.ndarray:
    """Channel mode: mean_rgb (3,). Pixel mode: the center 224x224 patch of mean_image, (224, 224, 3), as
    cuda-convnet2 subtracts from every crop whatever its position."""
    if mode == "channel":
        return np.asarray(stats["mean_rgb"], np.float64)
    if mode == "pixel":
        border = (np.asarray(stats["mean_image"]).shape[0] - CROP) // 2
        return np.asarray(stats["mean_image"], np.float64)[border:border + CROP, border:border + CROP]
    raise ValueError(f"mean mode must be one of {MEAN_MODES}, got {mode!r}")


def augment(image: np.ndarray, x: int, y: int, flip: bool, mean: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Crop at (x, y), mirror if `flip`, subtract `mean` and add the lighting `shift`: float32 (3, 224, 224)."""
    crop = image[y:y + CROP, x:x + CROP].astype(np.float32)
    if flip:
        crop = crop[:, ::-1]
    out = crop - np.asarray(mean, np.float32) + np.asarray(shift, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def ten_crop(image: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The paper's ten test views of one image, float32 (10, 3, 224, 224), in TEN_CROPS order."""
    return np.stack([augment(image, x, y, flip, mean) for x, y, flip in TEN_CROPS])


def random_params(rng: np.random.Generator, sigma: float, size: int = 256):
    """One draw of the training choices: crop offsets (all 33x33 possible), flip (p=0.5), alphas."""
    span = size - CROP + 1
    return (int(rng.integers(span)), int(rng.integers(span)), bool(rng.random() < 0.5),
            rng.normal(0.0, sigma, 3) if sigma > 0 else np.zeros(3))


WORDS_PER_SAMPLE = 8  # two Philox4x64 counters: x, y, flip and two Box-Muller pairs for the alphas


def counter_draws(key: tuple[int, int], start: int, count: int, sigma: float, size: int = 256):
    """The training draws of positions start .. start+count-1 of one epoch's order: (x, y, flip, alpha),
    arrays of `count` offsets in 0..size-224, flips (bool) and [count, 3] alphas ~ N(0, sigma).

    A counter-based generator (Philox, keyed on `key` = (seed, epoch)): position i's draws are a pure function
    of (key, i), so they do not depend on how the positions are cut into batches or shared among ranks, and a
    resumed run needs no generator state, only its position."""
    seed, epoch = (int(v) for v in key)
    bits = np.random.Philox(key=[seed, epoch], counter=[2 * start, 0, 0, 0])
    words = bits.random_raw(WORDS_PER_SAMPLE * count).reshape(count, WORDS_PER_SAMPLE)
    span = size - CROP + 1
    x, y = (words[:, k] % np.uint64(span) for k in (0, 1))
    flip = (words[:, 2] >> np.uint64(63)).astype(bool)
    u = ((words[:, 3:7] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    radius = np.sqrt(-2.0 * np.log(u[:, [0, 2]]))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u[:, [1, 3]]), radius * np.sin(2 * np.pi * u[:, [1, 3]])], 1)
    return x.astype(np.int64), y.astype(np.int64), flip, sigma * normals[:, :3]
