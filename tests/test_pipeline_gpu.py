"""The GPU path (mixed decoding, gpu operators). Skipped where torch sees no GPU; run on a lent GPU with
tools/gpu_check.sh."""

import numpy as np
import pytest
import torch

from alexnet_pipeline import augment
from alexnet_pipeline.pipeline import Loader, LoaderConfig, eval_loader, exposed_names, train_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("draws", ["host", "dali"])
def test_gpu_train_output_equals_the_reference_for_the_same_draws(prepped, draws):
    with np.load(prepped / "stats.npz") as z:
        stats = {k: z[k] for k in z.files}
    cfg = LoaderConfig(shards=prepped, split="train", batch_size=8, device="cuda", num_threads=2, mean="pixel",
                       draws=draws)
    outs = Loader(cfg, True).graph(expose=True).run()
    named = dict(zip(exposed_names(cfg, True), outs, strict=True))
    out, image = named["out"].as_cpu(), named["image"].as_cpu()  # decoded by nvJPEG, so compare with that decode
    for i in range(8):
        if draws == "host":
            alpha = np.array(named["alpha"][i], np.float64)
        else:
            alpha = np.array([float(np.array(named[f"alpha{j}"][i])) for j in range(3)])
        x, y = (round(float(np.array(named[k][i])) * 32) for k in ("x", "y"))
        shift = augment.lighting_shift(alpha, stats["eigval"], stats["eigvec"], "sqrt")
        ref = augment.augment(np.array(image[i]), x, y, bool(np.array(named["mirror"][i])),
                              augment.mean_to_subtract(stats, "pixel"), shift)
        np.testing.assert_allclose(np.array(out[i]), ref, atol=2e-3)


def test_gpu_and_cpu_center_crops_agree_within_decoder_tolerance(prepped):
    gpu = next(iter(eval_loader(prepped, batch_size=8, device="cuda", num_threads=2)))[0].cpu()
    cpu = next(iter(eval_loader(prepped, batch_size=8, device="cpu", num_threads=2)))[0]
    assert (gpu - cpu).abs().mean() < 1.5 and (gpu - cpu).abs().max() <= 16


@pytest.mark.parametrize("dtype,channels_last", [("float16", False), ("bfloat16", True), ("float32", True)])
def test_gpu_outputs_live_on_the_gpu_with_the_asked_dtype_and_layout(prepped, dtype, channels_last):
    images, labels = next(iter(train_loader(prepped, batch_size=8, device="cuda", dtype=dtype,
                                            channels_last=channels_last, num_threads=2)))
    assert images.is_cuda and labels.is_cuda and images.dtype == getattr(torch, dtype)
    assert images.shape == (8, 3, 224, 224)
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gpu_tencrop_shape(prepped):
    images, _ = next(iter(eval_loader(prepped, batch_size=4, device="cuda", tencrop=True, num_threads=2)))
    assert images.shape == (4, 10, 3, 224, 224) and images.is_cuda


def test_cpu_decoding_feeds_the_gpu_augmentation_with_the_cpu_loaders_pixels(prepped):
    gpu = next(iter(eval_loader(prepped, batch_size=8, device="cuda", decoder="cpu", num_threads=2)))[0]
    cpu = next(iter(eval_loader(prepped, batch_size=8, device="cpu", num_threads=2)))[0]
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)  # the same libjpeg-turbo decode


@pytest.mark.parametrize("load", [0.0, 0.5, 1.0])
def test_every_hardware_decoder_share_gives_batches(prepped, load):
    images, labels = next(iter(train_loader(prepped, batch_size=8, device="cuda", decoder="mixed",
                                            hw_decoder_load=load, num_threads=2)))
    assert images.shape == (8, 3, 224, 224) and images.is_cuda and labels.is_cuda
