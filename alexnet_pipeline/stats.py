"""Streaming training-set statistics: per-pixel and per-channel mean, RGB covariance and its PCA.

All sums are integers (kept in int64), so merging per-worker partial sums is exact and the result does not
depend on how images were split across workers or in which order partials were merged. For the full
ImageNet train set the largest sum (of squared pixel values) is about 5.5e15, below 2**53, so the float64
matrix product used per image is exact too. Imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# A uint16 per-pixel sum holds 257 images of 255 exactly; it is folded into the int64 sum before it could
# overflow. Adding uint8 into uint16 is about 5x cheaper than into int64.
_PENDING_MAX = np.iinfo(np.uint16).max // 255


@dataclass
class Moments:
    """Exact integer sums over a set of `size` x `size` RGB images."""

    size: int
    n_images: int = 0
    pixel_sum: np.ndarray = field(default=None)  # (size, size, 3) int64: per-pixel sum
    outer_sum: np.ndarray = field(default=None)  # (3, 3) int64: sum over all pixels of x x^T

    def __post_init__(self):
        if self.pixel_sum is None:
            self.pixel_sum = np.zeros((self.size, self.size, 3), np.int64)
        if self.outer_sum is None:
            self.outer_sum = np.zeros((3, 3), np.int64)
        self._pending = np.zeros((3, self.size, self.size), np.uint16)  # channel planes, folded as (H, W, 3)
        self._n_pending = 0
        self._planar = np.empty((3, self.size * self.size), np.float64)

    def add(self, image: np.ndarray) -> None:
        """Add one uint8 (size, size, 3) image."""
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.size}, {self.size}, 3), got {image.dtype} {image.shape}")
        self.add_planes(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def add_planes(self, planes: np.ndarray) -> None:
        """Add one image given as uint8 channel planes (3, size, size): the fast path (prep's)."""
        if planes.shape != (3, self.size, self.size) or planes.dtype != np.uint8:
            raise ValueError(f"expected uint8 (3, {self.size}, {self.size}), got {planes.dtype} {planes.shape}")
        self._pending += planes
        self._n_pending += 1
        if self._n_pending == _PENDING_MAX:
            self._fold()
        # x x^T as six dot products of contiguous float64 planes: each partial sum is an integer below 2**53,
        # so the result is exact in any summation order (OpenBLAS's 65536 x 3 matrix product is 10x slower)
        planar = self._planar
        np.copyto(planar, planes.reshape(3, -1))
        r, g, b = planar
        rg, rb, gb = np.dot(r, g), np.dot(r, b), np.dot(g, b)
        self.outer_sum += np.array([[np.dot(r, r), rg, rb], [rg, np.dot(g, g), gb], [rb, gb, np.dot(b, b)]],
                                   np.int64)  # exact: integers below 2**53 convert exactly
        self.n_images += 1

    def _fold(self) -> None:
        """Move the pending uint16 sums into the int64 per-pixel sum."""
        self.pixel_sum += self._pending.transpose(1, 2, 0)
        self._pending[...] = 0
        self._n_pending = 0

    def totals(self) -> "Moments":
        """Self, with every added image folded into pixel_sum (call before reading pixel_sum)."""
        if self._n_pending:
            self._fold()
        return self

    def merge(self, other: "Moments") -> None:
        """Add another partial sum into this one."""
        if other.size != self.size:
            raise ValueError("cannot merge moments of different image sizes")
        self.totals().pixel_sum += other.totals().pixel_sum
        self.outer_sum += other.outer_sum
        self.n_images += other.n_images

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The sums as arrays; the per-pixel sum in the smallest unsigned type that holds it exactly (a unit
        of one image writes 196 KB, not 1.5 MB)."""
        self.totals()
        dtype = np.min_scalar_type(255 * max(1, self.n_images))
        return {prefix + "n_images": np.array(self.n_images), prefix + "pixel_sum": self.pixel_sum.astype(dtype),
                prefix + "outer_sum": self.outer_sum}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "Moments":
        pixel_sum = np.array(arrays[prefix + "pixel_sum"], np.int64)
        return cls(pixel_sum.shape[0], int(arrays[prefix + "n_images"]), pixel_sum,
                   np.array(arrays[prefix + "outer_sum"], np.int64))


def summarize(m: Moments) -> dict[str, np.ndarray]:
    """The contents of stats.npz (0-255 RGB units): means, std, covariance and its eigenpairs."""
    if m.n_images == 0:
        raise ValueError("no images: statistics are undefined")
    m.totals()
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
