"""One image in, one 256x256 baseline JPEG out: the paper's preprocessing of a single file.

Short side resized to `size`, then the central `size` x `size` square kept. We resize only the central
square (``Image.resize(box=...)``), which is the same as resize-then-crop up to sub-pixel rounding but
never spends time on pixels that would be cropped away. Large JPEGs are first shrunk in the DCT domain
(``Image.draft``), which libjpeg does almost for free while decoding; draft never goes below the
requested size, so the final resize is still a proper antialiased (Lanczos) downscale.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Lanczos is what PIL called ANTIALIAS, the filter cuda-convnet2's make-data used.
RESAMPLE = Image.Resampling.LANCZOS

# ImageNet has files with broken EXIF blocks; PIL warns about each, which would flood a prep log.
warnings.filterwarnings("ignore", message=".*(EXIF|exif).*")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(ValueError):
    """The bytes are not an image we can use; the message says why."""


def decode_rgb(data: bytes, size: int) -> Image.Image:
    """Decode any PIL-readable image to RGB, letting JPEGs shrink in the DCT domain towards `size`."""
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
        # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= size.
        im.draft("RGB", (size, size))
        im.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from e
    except UnidentifiedImageError:
        raise BadImage("not an image (no format PIL knows)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image" / "truncated"
        raise BadImage(f"cannot decode: {e}") from e
    if im.mode != "RGB":
        # CMYK (22 ImageNet train files), grayscale, palette and alpha PNGs all end as plain RGB.
        im = im.convert("RGB")
    return im


def center_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and keep the central `size` x `size` square."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))


def prepare(data: bytes, size: int = 256, quality: int = 95) -> tuple[bytes, np.ndarray]:
    """Return the baseline JPEG bytes of the `size` x `size` center crop and the pixels that were encoded."""
    im = center_square(decode_rgb(data, size), size)
    buf = io.BytesIO()
    # progressive=False and optimize=False keep the output baseline and the bytes deterministic.
    im.save(buf, "JPEG", quality=quality, progressive=False, optimize=False)
    return buf.getvalue(), np.asarray(im)


def pil_flavour() -> str:
    """Which PIL is imported: 'Pillow-SIMD x.y' or 'Pillow x.y'.

    Installing anything that depends on pillow overwrites Pillow-SIMD's files but leaves its metadata
    behind, so we compare the imported version with the SIMD distribution's instead of trusting either.
    """
    from importlib import metadata

    import PIL

    try:
        simd = metadata.version("pillow-simd")
    except metadata.PackageNotFoundError:
        simd = None
    return f"{'Pillow-SIMD' if simd == PIL.__version__ else 'Pillow'} {PIL.__version__}"
