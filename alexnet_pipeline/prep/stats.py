"""Streaming training-set statistics: per-pixel and per-channel mean, RGB covariance and its PCA.

All sums are integers (kept in int64), so merging per-worker partial sums is exact and the result does not
depend on how images were split across workers or in which order partials were merged. For the full
ImageNet train set the largest sum (of squared pixel values) is about 5.5e15, below 2**53, so the float64
dot products used per image are exact too. The sums are kept as channel planes (3, size, size), the layout
in which an image's channels are read fastest; `pixel_sum` shows them as (size, size, 3). Imports nothing
from the package.
"""

from __future__ import annotations

import numpy as np

_scratches: dict[int, np.ndarray] = {}


def _scratch(size: int) -> np.ndarray:
    """The float64 planes buffer of add_planes, one per process and size: a fresh 1.5 MB buffer for every
    Moments would cost its page faults again in every unit of work (most of a one-image unit's statistics)."""
    if size not in _scratches:
        _scratches[size] = np.empty((3, size * size), np.float64)
    return _scratches[size]


# A uint16 per-pixel sum holds 257 images of 255 exactly; it is folded into the int64 sum before it could
# overflow. Adding uint8 into uint16 is about 5x cheaper than into int64.
_PENDING_MAX = np.iinfo(np.uint16).max // 255


class Moments:
    """Exact integer sums over a set of `size` x `size` RGB images: per-pixel sums and the sum over all
    pixels of x x^T. Buffers are made when first needed, so a small unit of work pays only for what it uses."""

    def __init__(self, size: int, n_images: int = 0, plane_sum: np.ndarray | None = None,
                 outer_sum: np.ndarray | None = None):
        self.size, self.n_images = size, n_images
        self._sum = plane_sum  # (3, size, size) int64, or None while everything is pending
        self.outer_sum = np.zeros((3, 3), np.int64) if outer_sum is None else outer_sum
        self._pending: np.ndarray | None = None  # (3, size, size) uint16
        self._n_pending = 0

    def add(self, image: np.ndarray) -> None:
        """Add one uint8 (size, size, 3) image."""
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.size}, {self.size}, 3), got {image.dtype} {image.shape}")
        self.add_planes(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def add_planes(self, planes: np.ndarray) -> None:
        """Add one image given as uint8 channel planes (3, size, size): the fast path (prep's)."""
        if planes.shape != (3, self.size, self.size) or planes.dtype != np.uint8:
            raise ValueError(f"expected uint8 (3, {self.size}, {self.size}), got {planes.dtype} {planes.shape}")
        if self._pending is None:
            self._pending = planes.astype(np.uint16)
        else:
            self._pending += planes
        self._n_pending += 1
        if self._n_pending == _PENDING_MAX:
            self._fold()
        # x x^T as six dot products of contiguous float64 planes: each partial sum is an integer below 2**53,
        # so the result is exact in any summation order (OpenBLAS's 65536 x 3 matrix product is 10x slower)
        planar = _scratch(self.size)
        np.copyto(planar, planes.reshape(3, -1))
        r, g, b = planar
        rg, rb, gb = np.dot(r, g), np.dot(r, b), np.dot(g, b)
        self.outer_sum += np.array([[np.dot(r, r), rg, rb], [rg, np.dot(g, g), gb], [rb, gb, np.dot(b, b)]],
                                   np.int64)  # exact: integers below 2**53 convert exactly
        self.n_images += 1

    def _fold(self) -> None:
        """Move the pending uint16 sums into the int64 sum."""
        assert self._pending is not None  # only called with images pending
        if self._sum is None:
            self._sum = self._pending.astype(np.int64)
        else:
            self._sum += self._pending
        self._pending, self._n_pending = None, 0

    @property
    def plane_sum(self) -> np.ndarray:
        """The per-pixel sums as int64 channel planes (3, size, size)."""
        if self._n_pending:
            self._fold()
        if self._sum is None:
            self._sum = np.zeros((3, self.size, self.size), np.int64)
        return self._sum

    @property
    def pixel_sum(self) -> np.ndarray:
        """The per-pixel sums as (size, size, 3) int64 (a view of plane_sum)."""
        return self.plane_sum.transpose(1, 2, 0)

    def merge(self, other: "Moments") -> None:
        """Add another partial sum into this one."""
        if other.size != self.size:
            raise ValueError("cannot merge moments of different image sizes")
        np.add(self.plane_sum, other.plane_sum, out=self.plane_sum)
        self.outer_sum += other.outer_sum
        self.n_images += other.n_images

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sums as arrays; the per-pixel sums as planes in the smallest unsigned type that holds them
        exactly (a unit of one image writes 196 KB, not 1.5 MB)."""
        dtype = np.min_scalar_type(255 * max(1, self.n_images))
        if self._sum is None and self._pending is not None:  # all still pending: no int64 pass at all
            planes = self._pending.astype(dtype)
        else:
            planes = self.plane_sum.astype(dtype)
        return {"n_images": np.array(self.n_images), "plane_sum": planes, "outer_sum": self.outer_sum}

    @classmethod
    def from_arrays(cls, arrays) -> "Moments":
        """The sums to_arrays gave (as any unsigned type), as int64."""
        planes = np.asarray(arrays["plane_sum"]).astype(np.int64)
        return cls(planes.shape[1], int(arrays["n_images"]), planes, np.array(arrays["outer_sum"], np.int64))


def summarize(m: Moments) -> dict[str, np.ndarray]:
    """The contents of stats.npz (0-255 RGB units): means, std, covariance and its eigenpairs."""
    if m.n_images == 0:
        raise ValueError("no images: statistics are undefined")
    n = m.n_images * m.size * m.size
    channel_sum = m.pixel_sum.sum(axis=(0, 1))
    # n^2 * cov = n * sum(x x^T) - s s^T, done in Python integers so nothing cancels catastrophically.
    s = [int(v) for v in channel_sum]
    cov = np.array([[(n * int(m.outer_sum[i, j]) - s[i] * s[j]) / (n * n) for j in range(3)]
                    for i in range(3)], np.float64)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # Fix each eigenvector's sign (largest-magnitude component positive) so the file is reproducible.
    signs = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), range(3)])
    eigvec = eigvec * np.where(signs == 0, 1.0, signs)
    return {
        "mean_rgb": channel_sum / n,
        "std_rgb": np.sqrt(np.diag(cov)),
        "mean_image": m.pixel_sum / m.n_images,
        "cov": cov,
        "eigval": eigval,
        "eigvec": eigvec,
        "n_pixels": np.array(n, np.int64),
    }
