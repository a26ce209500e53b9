"""The trainer, its CUDA-graph step and evaluation on GPUs (bfloat16 autocast, channels_last, nvJPEG batches).
Skipped where torch sees no GPU; run on a lent GPU with tools/gpu_check.sh."""

import json
import subprocess
import sys

import pytest
import torch

from alexnet_pipeline import evaluate, train
from alexnet_pipeline.checkpoint import Checkpoint
from alexnet_pipeline.model import AlexNet, AlexNetConfig, TwoColumnAlexNet, place
from alexnet_pipeline.optim import PaperSGD
from alexnet_pipeline.pipeline import eval_loader, train_loader
from alexnet_pipeline.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = dict(width=0.25, global_batch=8, log_every=2, device="cuda", num_threads=2, compile=False)


def test_gpu_training_bfloat16_channels_last_compiled_graph_checkpoint_and_eval(prepped, tmp_path):
    out = tmp_path / "run"
    summary = train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, **{**GPU, "compile": True}))
    assert summary["tencrop"]["images"] > 0
    ckpt = Checkpoint.load(out / train.CHECKPOINT)
    assert ckpt.training.ranks[0].cuda_rng.dtype == torch.uint8 and all(v.device.type == "cpu"
                                                                        for v in ckpt.weights.values())
    model = ckpt.network("cuda")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    gpu = evaluate.errors(evaluate.error_counts(model, eval_loader(prepped, batch_size=8, device="cuda",
                                                                   dtype="bfloat16", channels_last=True)))
    cpu = evaluate.errors(evaluate.error_counts(ckpt.network("cpu"), eval_loader(prepped, batch_size=8, device="cpu")))
    assert gpu["images"] == cpu["images"] and abs(gpu["top1_error"] - cpu["top1_error"]) <= 0.2


def _steps(prepped, graph: bool, batches, dropout=0.0):
    """Weights and per-step rows after the same batches, with an lr drop half-way."""
    torch.manual_seed(0)
    net = place(AlexNet(AlexNetConfig(4, width=0.25, dropout=dropout)), torch.device("cuda"))
    opt = PaperSGD(net.named_parameters(), 0.01)
    step = TrainStep(net, opt, torch.device("cuda"), graph=graph)
    rows = []
    for i, (x, y) in enumerate(batches):
        if i == len(batches) // 2:
            opt.set_lr(0.001)
        rows.append(step(x, y))
    return [r.cpu() for r in rows], {k: v.float().cpu() for k, v in net.state_dict().items()}


def test_the_graph_step_equals_the_eager_step_through_an_lr_drop(prepped):
    loader = train_loader(prepped, batch_size=8, device="cuda", dtype="bfloat16", channels_last=True, num_threads=2)
    batches = [(x.clone(), y.clone()) for x, y in loader][:6]
    eager_rows, eager = _steps(prepped, False, batches)
    graph_rows, graphed = _steps(prepped, True, batches)
    torch.testing.assert_close(torch.stack(graph_rows), torch.stack(eager_rows), rtol=2e-2, atol=2e-2)
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=2e-2, atol=2e-3, msg=k)
    start = place(AlexNet(AlexNetConfig(4, width=0.25)), torch.device("cpu")).state_dict()
    assert not torch.allclose(graphed["conv1.weight"], start["conv1.weight"].float())  # the replays trained


def test_graph_replays_draw_new_dropout_masks_and_restoring_the_generator_repeats_one(prepped):
    x, y = next(iter(train_loader(prepped, batch_size=8, device="cuda", dtype="bfloat16", channels_last=True,
                                  num_threads=2)))
    torch.manual_seed(0)
    net = place(AlexNet(AlexNetConfig(4, width=0.25)), torch.device("cuda"))
    step = TrainStep(net, PaperSGD(net.named_parameters(), 1e-12), torch.device("cuda"), graph=True)
    step(x, y)  # capture
    state = torch.cuda.get_rng_state()
    a, b = step(x, y)[0].item(), step(x, y)[0].item()
    torch.cuda.set_rng_state(state)
    again = step(x, y)[0].item()
    assert a != b and again == pytest.approx(a, rel=1e-3)


def test_a_resumed_gpu_run_repeats_the_uninterrupted_losses(prepped, tmp_path):
    import os
    import signal

    def losses(run_dir):
        return [v for line in (run_dir / train.LOG).read_text().splitlines()
                for v in json.loads(line).get("losses", [])]

    whole = tmp_path / "whole"
    train.run(train.TrainConfig(shards=prepped, out=whole, epochs=2, final_tencrop=False, **GPU))
    cut = tmp_path / "cut"
    cfg = train.TrainConfig(shards=prepped, out=cut, epochs=2, final_tencrop=False, **GPU)
    fed = []

    def stop_mid_epoch_two(images, labels):
        fed.append(1)
        if len(fed) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train.run(cfg, on_batch=stop_mid_epoch_two)["stopped"] == signal.SIGTERM
    cfg.resume = True
    train.run(cfg)
    a, b = losses(whole), losses(cut)
    assert len(a) == len(b)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-2, atol=1e-3)


def test_two_ranks_share_one_gpu_with_gloo_train_resume_and_count_every_image_once(prepped, tmp_path):
    run = ["torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "alexnet_pipeline"]
    common = ["train", "--shards", str(prepped), "--out", str(tmp_path / "run"), "--backend", "gloo", "--device",
              "cuda:0", "--width", "0.25", "--global-batch", "8", "--threads", "2", "--no-final-tencrop",
              "--no-compile"]
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        r = subprocess.run([sys.executable, "-m", *run, *common, *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    ckpt = Checkpoint.load(tmp_path / "run" / train.CHECKPOINT)
    assert ckpt.epoch == 2 and len(ckpt.training.ranks) == 2
    r = subprocess.run([sys.executable, "-m", *run, "eval", "--shards", str(prepped), "--checkpoint",
                        str(tmp_path / "run" / train.CHECKPOINT), "--tencrop", "--json", "--device", "cuda:0",
                        "--backend", "gloo",
                        "--batch-size", "4", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    n_val = json.loads((prepped / "dataset.json").read_text())["splits"]["val"]["samples"]
    assert result["ranks"] == 2 and result["center"]["images"] == result["tencrop"]["images"] == n_val


def test_two_columns_on_one_gpu_equal_the_grouped_model_and_train_resume_and_evaluate(prepped, tmp_path):
    torch.manual_seed(0)
    grouped = AlexNet(AlexNetConfig(num_classes=10, width=0.25)).eval().double()
    split = TwoColumnAlexNet(grouped, ("cuda:0", "cuda:0")).eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64) * 50
    torch.testing.assert_close(split(x.cuda()).cpu(), grouped(x), rtol=1e-7, atol=1e-7)
    for m, inp in ((grouped, x), (split, x.cuda())):
        m(inp).logsumexp(1).sum().backward()
    torch.testing.assert_close(torch.cat([c.conv2.weight.grad.cpu() for c in split.columns]),
                               grouped.conv2.weight.grad, rtol=1e-7, atol=1e-9)
    out = tmp_path / "mp"
    cfg = dict(shards=prepped, out=out, model_parallel=True, column_devices="cuda:0,cuda:0", final_tencrop=False, **GPU)
    train.run(train.TrainConfig(epochs=1, **cfg))
    train.run(train.TrainConfig(epochs=2, resume=True, **cfg))
    ckpt = Checkpoint.load(out / train.CHECKPOINT)
    assert ckpt.epoch == 2 and set(ckpt.weights) == set(AlexNet(AlexNetConfig(4, width=0.25)).state_dict())
    assert evaluate.errors(evaluate.error_counts(ckpt.network("cuda"),
                                                 eval_loader(prepped, batch_size=8, device="cuda")))["images"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_columns_on_two_gpus_equal_the_grouped_model():
    torch.manual_seed(0)
    grouped = AlexNet(AlexNetConfig(num_classes=10)).eval()
    split = TwoColumnAlexNet(grouped, ("cuda:0", "cuda:1")).eval()
    x = torch.randn(4, 3, 224, 224) * 50
    with torch.no_grad():
        torch.testing.assert_close(split(x.cuda()).cpu(), grouped(x), rtol=1e-3, atol=1e-3)


def test_the_data_wait_is_the_gpus_idle_time_between_steps_not_the_hosts_time_in_next():
    """A host that waits while the GPU is still busy (an asynchronous step far longer than the wait) shows a
    high host wait and almost no data wait; a GPU that finishes each step before the host brings the next
    shows a high data wait."""
    import time

    from alexnet_pipeline.clock import StepClock

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)  # a kernel that spins for a number of cycles: calibrate it in ms
    end.record()
    end.synchronize()
    ms_per_cycle = start.elapsed_time(end) / 10**7

    def interval(gpu_ms: float, host_ms: float):
        clock = StepClock(torch.device("cuda"))
        cycles = int(gpu_ms / ms_per_cycle)
        for _ in range(10):
            with clock.waiting():
                time.sleep(host_ms / 1e3)
            with clock.stepping():
                torch.cuda._sleep(cycles)
        torch.cuda.synchronize()  # the trainer's interval sync
        return clock.interval()

    wait, host = interval(gpu_ms=30, host_ms=5)  # the host runs ahead: the GPU never waits
    assert wait < 0.1 and host > 0.05, (wait, host)
    wait, host = interval(gpu_ms=1, host_ms=20)  # the GPU waits for every batch
    assert wait > 0.8 and host > 0.8, (wait, host)
