import io

import numpy as np
from PIL import Image

from alexnet_pipeline.stats import Moments, summarize
from conftest import read_samples


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
