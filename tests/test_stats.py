import io

import numpy as np
from conftest import read_samples
from PIL import Image

from alexnet_pipeline.prep.stats import Moments, summarize


def _images(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (size, size, 3)) * rng.uniform(0.2, 1, 3)).astype(np.uint8) for _ in range(n)]


def test_summary_matches_direct_numpy():
    images = _images(7)
    m = Moments(16)
    for im in images:
        m.add(im)
    s = summarize(m)
    x = np.stack(images).astype(np.float64)
    np.testing.assert_allclose(s["mean_image"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["mean_rgb"], x.reshape(-1, 3).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["cov"], np.cov(x.reshape(-1, 3).T, bias=True), rtol=1e-9)
    np.testing.assert_allclose(s["std_rgb"], x.reshape(-1, 3).std(0), rtol=1e-9)
    assert int(s["n_pixels"]) == 7 * 16 * 16


def test_eigenpairs_reconstruct_the_covariance_in_descending_order():
    m = Moments(16)
    for im in _images(5, seed=2):
        m.add(im)
    s = summarize(m)
    v, lam = s["eigvec"], s["eigval"]
    np.testing.assert_allclose(v @ np.diag(lam) @ v.T, s["cov"], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
    assert lam[0] >= lam[1] >= lam[2] > 0


def test_merged_partial_sums_are_exactly_the_whole():
    images = _images(9, seed=4)
    whole, a, b = Moments(16), Moments(16), Moments(16)
    for i, im in enumerate(images):
        whole.add(im)
        (a if i % 3 else b).add(im)
    b.merge(a)
    for key, value in summarize(whole).items():
        assert np.array_equal(value, summarize(b)[key]), key


def test_prepped_stats_match_the_decoded_training_shards(prepped):
    x = np.stack([np.asarray(Image.open(io.BytesIO(jpeg)), np.float64)
                  for _, jpeg in read_samples(prepped, "train").values()])
    with np.load(prepped / "stats.npz") as z:
        assert int(z["n_pixels"]) == x.shape[0] * 256 * 256
        # the stats are taken on the pixels before JPEG encoding, so allow quality-95 encoding error
        np.testing.assert_allclose(z["mean_rgb"], x.reshape(-1, 3).mean(0), atol=0.5)
        np.testing.assert_allclose(z["mean_image"], x.mean(0), atol=6)
        # (4:2:0 chroma subsampling blurs textured colour: off-diagonal terms move by up to ~0.2% of a variance)
        np.testing.assert_allclose(z["cov"], np.cov(x.reshape(-1, 3).T, bias=True), rtol=0.02,
                                   atol=0.005 * np.max(np.diag(z["cov"])))


def test_the_sums_are_exact_against_python_integers_including_all_255_images():
    """int64 totals equal a Python-integer reference over random and saturated images, past the point where
    the uint16 per-pixel accumulator is folded (257 images), and through the unit file's small dtype."""
    rng = np.random.default_rng(7)
    size = 8
    images = [np.full((size, size, 3), 255, np.uint8)] * 300 + \
        [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(40)]
    m = Moments(size)
    for im in images:
        m.add(im)
    flat = [im.reshape(-1, 3).tolist() for im in images]
    outer = [[sum(p[i] * p[j] for pixels in flat for p in pixels) for j in range(3)] for i in range(3)]
    per_pixel = [[[sum(int(im[y, x, c]) for im in images) for c in range(3)] for x in range(size)] for y in range(size)]
    assert m.outer_sum.tolist() == outer and m.pixel_sum.tolist() == per_pixel and m.n_images == 340
    again = Moments.from_arrays(m.to_arrays())
    assert again.pixel_sum.dtype == np.int64 and again.pixel_sum.tolist() == per_pixel
    assert m.to_arrays()["plane_sum"].dtype == np.uint32  # 340 x 255 needs 17 bits
    few = Moments(size)
    for im in images[-3:]:
        few.add(im)  # all pending: written from the uint16 sums directly
    expected = np.sum(images[-3:], axis=0, dtype=np.int64).tolist()
    assert Moments.from_arrays(few.to_arrays()).pixel_sum.tolist() == expected
