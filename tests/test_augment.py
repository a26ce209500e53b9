import numpy as np
import pytest

from alexnet_pipeline import augment


def test_lighting_forms_differ_as_documented():
    eigval = np.array([14000.0, 1200.0, 300.0])
    sqrt, eig = augment.lighting_scale(eigval, "sqrt"), augment.lighting_scale(eigval, "eigval")
    np.testing.assert_allclose(sqrt, np.sqrt(eigval))
    np.testing.assert_allclose(eig * 255, eigval)
    with pytest.raises(ValueError):
        augment.lighting_scale(eigval, "paper")


def test_shift_is_eigvec_times_scaled_alpha():
    v = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    shift = augment.lighting_shift(np.array([1.0, 0, 0]), np.array([4.0, 1, 1]), v, "sqrt")
    np.testing.assert_allclose(shift, 2 * v[:, 0])


def test_ten_crops_are_corners_center_and_mirrors():
    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    views = augment.ten_crop(image, np.zeros(3))
    assert views.shape == (10, 3, 224, 224)
    np.testing.assert_array_equal(views[0], image[:224, :224].transpose(2, 0, 1))
    np.testing.assert_array_equal(views[1], image[:224, 32:].transpose(2, 0, 1))
    np.testing.assert_array_equal(views[2], image[32:, :224].transpose(2, 0, 1))
    np.testing.assert_array_equal(views[3], image[32:, 32:].transpose(2, 0, 1))
    np.testing.assert_array_equal(views[4], image[16:240, 16:240].transpose(2, 0, 1))
    np.testing.assert_array_equal(views[6], views[1][:, :, ::-1])


def test_pixel_mean_is_the_center_patch():
    stats = {"mean_image": np.arange(256 * 256 * 3, dtype=np.float64).reshape(256, 256, 3), "mean_rgb": np.ones(3)}
    patch = augment.mean_to_subtract(stats, "pixel")
    assert patch.shape == (224, 224, 3) and patch[0, 0, 0] == stats["mean_image"][16, 16, 0]


def test_random_params_cover_every_offset():
    rng = np.random.default_rng(2)
    draws = [augment.random_params(rng, 0.1) for _ in range(4000)]
    assert {d[0] for d in draws} == set(range(33)) and {d[1] for d in draws} == set(range(33))
    assert 0.45 < np.mean([d[2] for d in draws]) < 0.55


def test_counter_draws_do_not_depend_on_how_samples_are_cut_into_batches():
    whole = augment.counter_draws((3, 2), 0, 40, 0.1)
    parts = [augment.counter_draws((3, 2), start, count, 0.1) for start, count in ((0, 7), (7, 25), (32, 8))]
    for a, b in zip(whole, zip(*parts, strict=True), strict=True):
        np.testing.assert_array_equal(a, np.concatenate(b))
    for other in ((3, 3), (4, 2)):  # each epoch and seed draws afresh
        assert not np.array_equal(whole[3], augment.counter_draws(other, 0, 40, 0.1)[3]), other


def test_counter_draws_have_the_papers_distributions():
    x, y, flip, alpha = augment.counter_draws((0, 0), 0, 200_000, 0.1)
    for v in (x, y):
        counts = np.bincount(v, minlength=33)
        assert len(counts) == 33 and abs(counts / len(v) * 33 - 1).max() < 0.05  # every offset 0..32, uniform
    assert abs(flip.mean() - 0.5) < 0.005
    np.testing.assert_allclose(alpha.std(0), 0.1, rtol=0.01)
    np.testing.assert_allclose(alpha.mean(0), 0.0, atol=0.001)
    assert abs(np.corrcoef(alpha.T)[np.triu_indices(3, 1)]).max() < 0.01  # three independent alphas
