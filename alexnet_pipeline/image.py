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
# A format this PIL build lacks (WebP on Pillow-SIMD) is named in the skip reason instead.
warnings.filterwarnings("ignore", message="image file could not be identified")


class BadImage(ValueError):
    """The bytes are not an image we can use; the message says why."""


# What a file really is, by its first bytes: (prefix, offset, name). Names the format in a skip reason.
SIGNATURES = [(b"\xff\xd8\xff", 0, "JPEG"), (b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"GIF87a", 0, "GIF"),
              (b"GIF89a", 0, "GIF"), (b"BM", 0, "BMP"), (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"),
              (b"WEBP", 8, "WebP"), (b"ftypavif", 4, "AVIF"), (b"ftypheic", 4, "HEIC"), (b"ftypheix", 4, "HEIC"),
              (b"ftypmif1", 4, "HEIF"), (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"), (b"\xff\x4f\xff\x51", 0,
              "JPEG 2000"), (b"%PDF", 0, "PDF"), (b"PK\x03\x04", 0, "ZIP archive"), (b"\x1f\x8b", 0, "gzip file"),
              (b"<!DOCTYPE html", 0, "HTML page"), (b"<html", 0, "HTML page"), (b"<?xml", 0, "XML (or SVG) file"),
              (b"<svg", 0, "SVG image")]


IMAGE_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WebP", "AVIF", "HEIC", "HEIF", "JPEG 2000", "SVG image"}


def _pil_reads(kind: str) -> bool:
    """Whether this PIL build decodes `kind` (JPEG, PNG, GIF, BMP and TIFF always; the rest are optional)."""
    from PIL import features

    optional = {"WebP": "webp", "AVIF": "avif", "JPEG 2000": "jpg_2000"}
    if kind in optional:
        return bool(features.check(optional[kind]))
    return kind in {"JPEG", "PNG", "GIF", "BMP", "TIFF"}


def sniff(data: bytes) -> str:
    """The format of `data` by its signature: 'JPEG', 'WebP', 'HTML page', ..., or 'unknown format'."""
    for prefix, offset, name in SIGNATURES:
        if data[offset:offset + len(prefix)] == prefix:
            return name
    if not data[:4096].strip(b"\0"):
        return "a file of zeros"  # what a failed download or a disk's hole leaves
    return "text" if data[:64].isascii() and data[:64].strip() else "unknown format"


def _to_8_bits(im: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale ('I;16*', 'I') as 8 bits by value >> 8 (PIL's own conversion clips at 255,
    which turns most of a 16-bit image white); float images ('F') clipped to 0-255."""
    a = np.asarray(im)
    if im.mode == "F":
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray(np.clip(a.astype(np.int64) >> 8, 0, 255).astype(np.uint8))


def decode_rgb(data: bytes, size: int) -> Image.Image:
    """Decode any image this PIL reads to RGB, letting JPEGs shrink in the DCT domain towards `size`. EXIF
    orientation is not applied (the ImageNet convention: pixels as stored)."""
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
        kind = sniff(data)
        if kind in IMAGE_FORMATS and not _pil_reads(kind):
            raise BadImage(f"a {kind} image, which this PIL build ({pil_flavour()}) cannot decode") from None
        if kind in IMAGE_FORMATS:
            raise BadImage(f"a damaged {kind} (PIL cannot read its header)") from None
        raise BadImage(f"not an image ({kind})") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image" / "truncated"
        raise BadImage(f"cannot decode this {sniff(data)} ({e})") from e
    return rgb(im)


def rgb(im: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB: 16-bit greyscale scaled, CMYK (22 ImageNet train files), greyscale,
    palette and alpha images converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8_bits(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def center_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and keep the central `size` x `size` square."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))


def prepare(data: bytes, size: int = 256, quality: int = 95) -> tuple[bytes, np.ndarray]:
    """Return the baseline JPEG bytes of the `size` x `size` center crop and the pixels that were encoded, as
    channel planes (3, size, size) uint8: what the statistics read fastest (stats.Moments.add_planes)."""
    im = center_square(decode_rgb(data, size), size)
    buf = io.BytesIO()
    # progressive=False and optimize=False keep the output baseline and the bytes deterministic.
    im.save(buf, "JPEG", quality=quality, progressive=False, optimize=False)
    return buf.getvalue(), np.stack([np.asarray(c) for c in im.split()])


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
