"""The trainer and evaluation on GPUs (bfloat16 autocast, channels_last, nvJPEG batches). Skipped where torch
sees no GPU; run on a lent GPU with tools/gpu_check.sh."""

import pytest
import torch

from alexnet_pipeline import evaluate, train
from alexnet_pipeline.model import AlexNet, AlexNetConfig, TwoColumnAlexNet
from alexnet_pipeline.pipeline import eval_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_training_bfloat16_channels_last_checkpoint_and_eval(prepped, tmp_path):
    out = tmp_path / "run"
    summary = train.run(train.TrainConfig(prepped, out, epochs=2, width=0.25, batch_size=8, log_every=2,
                                          device="cuda", threads=2))
    assert summary["tencrop"]["images"] > 0
    ckpt = torch.load(out / train.CHECKPOINT, weights_only=True)
    assert ckpt["ranks"][0]["cuda_rng"].dtype == torch.uint8 and all(v.device.type == "cpu"
                                                                     for v in ckpt["model"].values())
    model = evaluate.load_model(ckpt, torch.device("cuda"))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    gpu = evaluate.errors(evaluate.error_counts(model, eval_loader(prepped, batch_size=8, device="cuda",
                                                                   dtype="bfloat16", layout="NHWC")))
    cpu = evaluate.errors(evaluate.error_counts(evaluate.load_model(ckpt, torch.device("cpu")),
                                                eval_loader(prepped, batch_size=8)))
    assert gpu["images"] == cpu["images"] and abs(gpu["top1_error"] - cpu["top1_error"]) <= 0.2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_columns_on_two_gpus_equal_the_grouped_model():
    torch.manual_seed(0)
    grouped = AlexNet(AlexNetConfig(num_classes=10)).eval()
    split = TwoColumnAlexNet(grouped, ("cuda:0", "cuda:1")).eval()
    x = torch.randn(4, 3, 224, 224) * 50
    with torch.no_grad():
        torch.testing.assert_close(split(x.cuda()).cpu(), grouped(x), rtol=1e-3, atol=1e-3)
