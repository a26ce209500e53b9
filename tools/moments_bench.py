#!/usr/bin/env python3
"""The cost of prep's statistics per 256x256 image (stats.Moments.add_planes, one BLAS thread, as prep's
workers run it) against the form it replaced (an int64 per-pixel sum and a float64 65536 x 3 matrix product),
in the same process, on prepared photo-like images (tools/make_sample_imagenet.py): median of 5 repeats of
512 images after a warm-up. Both are exact; the test of exactness is tests/test_stats.py.

    python tools/moments_bench.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_sample_imagenet as maker  # noqa: E402

from alexnet_pipeline.image import prepare  # noqa: E402
from alexnet_pipeline.prep.stats import Moments  # noqa: E402


def _previous(images: list[np.ndarray]) -> None:
    pixel_sum, outer = np.zeros((256, 256, 3), np.int64), np.zeros((3, 3), np.int64)
    for im in images:
        pixel_sum += im
        x = im.reshape(-1, 3).astype(np.float64)
        outer += np.rint(x.T @ x).astype(np.int64)


def _current(planes: list[np.ndarray]) -> None:
    m = Moments(256)
    for p in planes:
        m.add_planes(p)


def _ms_per_image(fn, data, rounds: int = 8) -> float:
    def once():
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn(data)
        return (time.perf_counter() - t0) / (rounds * len(data)) * 1e3
    once()
    return statistics.median(once() for _ in range(5))


def main() -> int:
    rng = np.random.default_rng(0)
    planes = [prepare(maker.source_jpeg(rng, i % 10, 10))[1] for i in range(64)]
    images = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in planes]
    with threadpool_limits(1, user_api="blas"):
        now, before = _ms_per_image(_current, planes), _ms_per_image(_previous, images)
    print(f"statistics per 256x256 image, one core: {now:.3f} ms (the matrix-product form: {before:.3f} ms; "
          f"{before / now:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
