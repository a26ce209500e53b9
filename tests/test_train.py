"""The trainer on CPU: two gloo ranks, interrupt and resume, divergence, checkpoints, logs and plot."""

import json
import os
import signal
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import read_samples

from alexnet_pipeline import build, rundir, train
from alexnet_pipeline.config import UserError
from alexnet_pipeline.distributed import World
from alexnet_pipeline.model import AlexNet, AlexNetConfig
from alexnet_pipeline.pipeline import PAD_LABEL, Loader

TINY = dict(width=0.0625, global_batch=8, log_every=1, num_threads=1, final_tencrop=False)


def test_resuming_a_finished_run_adds_nothing(prepped, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = dict(shards=prepped, out=out, epochs=1, **{**TINY, "device": "cpu", "final_tencrop": True})
    train.run(train.TrainConfig(**cfg))
    before = (out / rundir.LOG).read_text()
    result = train.run(train.TrainConfig(resume=True, **cfg))
    assert result["finished"] and "finished already" in capsys.readouterr().out
    assert (out / rundir.LOG).read_text() == before  # one ten-crop line, not two


def test_the_logs_durations_read_as_hours_and_minutes_or_minutes_and_seconds():
    from alexnet_pipeline.runlog import duration

    assert [duration(s) for s in (59.9, 61, 3599, 3600, 3700, 90061)] == \
        ["0m59s", "1m01s", "59m59s", "1h00m", "1h01m", "25h01m"]


def _records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / train.LOG).read_text().splitlines()) if r["kind"] == kind]


def _fingerprints(images, labels):
    """Per sample: (label, sum of the augmented crop), what the rank was fed."""
    return [(int(y), round(float(x.double().sum()), 3)) for x, y in zip(images, labels, strict=True) if y != PAD_LABEL]


def _rank(rank, port, shards, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    seen = []
    trainer = train.Trainer(train.TrainConfig(shards=shards, out=out, epochs=2, device="cpu", **TINY),
                            on_batch=lambda x, y: seen.extend(_fingerprints(x, y)))
    trainer.fit()
    torch.save({"weights": trainer.parts.grouped_weights(), "seen": seen}, result_dir / f"rank{rank}.pt")
    trainer.world.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_identical_and_see_different_samples(prepped, tmp_path):
    mp.spawn(_rank, args=(_free_port(), prepped, tmp_path / "run", tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    torch.manual_seed(train.TrainConfig(shards=prepped, out=tmp_path).seed)  # the weights the run started from
    start = AlexNet(AlexNetConfig(4, width=TINY["width"]))
    assert not torch.equal(start.conv1.weight, r0["weights"]["conv1.weight"])  # it did train
    # each rank was fed exactly its own loader's stream (rank r of 2), and the two streams differ
    for r, result in enumerate((r0, r1)):
        cfg = train.TrainConfig(shards=prepped, out=tmp_path, **TINY)
        world = World(r, 2, r, torch.device("cpu"))
        loader = Loader(build.loader_config(cfg, world, "train"), True)
        expected = [f for _ in range(2) for x, y in loader for f in _fingerprints(x, y)]
        assert result["seen"] == expected
    # which samples each rank reads is the loader's (test_pipeline: disjoint ranks whose union is the epoch);
    # here: the ranks were fed different streams, with every sample once per epoch and no padding counted
    assert r0["seen"] != r1["seen"]
    assert len(r0["seen"]) + len(r1["seen"]) == 2 * loader.n_samples


def _cli(*args):
    return [sys.executable, "-c", "import sys; from alexnet_pipeline.cli import train_main; sys.exit(train_main())",
            *map(str, args)]


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(prepped, tmp_path):
    """SIGTERM after the 6th batch (mid-way through epoch 2 of 4 steps each): the run saves and stops there;
    resumed, it repeats the uninterrupted run's losses step for step and ends with its weights."""
    cfg = dict(shards=prepped, epochs=3, device="cpu", **TINY)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.run(train.TrainConfig(out=whole, **cfg))
    fed = []

    def term_after_six(images, labels):
        fed.append(1)
        if len(fed) == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler notes it; the loop stops at its interval

    result = train.run(train.TrainConfig(out=cut, **cfg), on_batch=term_after_six)
    assert result["stopped"] == signal.SIGTERM
    assert torch.load(cut / train.CHECKPOINT, weights_only=True)["step"] == 6
    train.run(train.TrainConfig(out=cut, resume=True, **cfg))
    steps = lambda d: [(r["step"], v) for r in _records(d) for v in r["losses"]]  # noqa: E731
    assert [s for s, _ in steps(cut)] == [s for s, _ in steps(whole)] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([v for _, v in steps(cut)]), torch.tensor([v for _, v in steps(whole)]),
                               rtol=1e-5, atol=1e-6)
    a, b = (torch.load(d / train.CHECKPOINT, weights_only=True) for d in (whole, cut))
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-5, atol=1e-7)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]


def test_checkpoint_log_and_plot(prepped, tmp_path):
    out = tmp_path / "run"
    summary = train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, device="cpu",
                                          **{**TINY, "final_tencrop": True}))
    manifest = json.loads((prepped / "dataset.json").read_text())
    ckpt = torch.load(out / train.CHECKPOINT, weights_only=True)  # plain tensors and Python values only
    assert ckpt["epoch"] == 2 and ckpt["classes"] == manifest["classes"]
    assert set(ckpt["ranks"][0]) >= {"loader", "torch_rng"} and ckpt["ranks"][0]["loader"]["step"] == 0
    assert torch.load(out / train.BEST, weights_only=True)["weights"].keys() == ckpt["weights"].keys()
    epochs = _records(out, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["val_top1_error"] <= 1 for e in epochs)
    assert all(0 <= r["data_wait"] <= 1 and r["interval_images_per_s"] > 0 for r in _records(out))
    assert all(0 <= e["data_wait"] <= 1 and e["images_per_s"] > 0 for e in epochs)
    assert summary["tencrop"]["images"] == manifest["splits"]["val"]["samples"]
    assert (out / train.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["lr"] == pytest.approx(0.01 * 8 / 128)
    cfg = train.TrainConfig(shards=prepped, out=out, epochs=2, device="cpu", **TINY)
    with pytest.raises(UserError, match="already holds a run"):
        train.run(cfg)  # never silently over a finished run
    with open(out / train.LOG, "a") as f:  # as if the run had crashed after logging past its checkpoint
        f.write(json.dumps({"kind": "train", "step": 999}) + "\n")
    cfg.resume = True
    train.run(cfg)
    assert all(r["step"] <= ckpt["step"] for r in _records(out)) and len(_records(out, "epoch")) == 2


def test_non_finite_loss_stops_naming_the_step(prepped, tmp_path):
    cfg = train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=1, device="cpu", lr=1e9, **TINY)
    with pytest.raises(train.Diverged, match=r"not finite at step \d+ \(epoch 1\)"):
        train.run(cfg)


def test_a_non_finite_loss_is_named_by_the_step_it_came_at(prepped, tmp_path):
    """Step 4's loss made NaN, inside the log interval of steps 3 and 4: step 4 is named."""
    cfg = train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=1, device="cpu", **{**TINY, "log_every": 2})
    trainer = train.Trainer(cfg)
    real, calls = trainer.parts.step, [0]

    def step(*batch):
        row = real(*batch)
        calls[0] += 1
        return torch.cat([torch.full_like(row[:1], float("nan")), row[1:]]) if calls[0] == 4 else row

    trainer.parts.step = step
    try:
        with pytest.raises(train.Diverged, match=r"not finite at step 4 \(epoch 1\)"):
            trainer.fit()
    finally:
        trainer.run.close()


def test_the_main_rank_is_rank_0_of_the_world_not_of_each_node():
    cpu = torch.device("cpu")
    assert World(rank=0, size=4, local_rank=0, device=cpu).main
    assert not World(rank=2, size=4, local_rank=0, device=cpu).main  # the second node's first rank


def test_schedule_divides_on_plateau_at_most_max_drops_times(tmp_path):
    s = train.Schedule(train.TrainConfig(shards=tmp_path, out=tmp_path, patience=2, max_drops=2))
    lrs = []
    for epoch, err in enumerate([0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]):
        s.after_epoch(epoch, err)
        lrs.append(s.lr)
    assert lrs[:3] == [0.01] * 3 and lrs[3] == pytest.approx(0.001) and lrs[-1] == pytest.approx(0.0001)
    step = train.Schedule(train.TrainConfig(shards=tmp_path, out=tmp_path, schedule="step", step_epochs=2,
                                            global_batch=256))
    lrs = []
    for epoch in range(4):
        step.after_epoch(epoch, 0.5)
        lrs.append(step.lr)
    # batch 256 doubles the default lr; /10 after every second epoch (epochs 2 and 4, counted from 1)
    assert lrs == pytest.approx([0.02, 0.002, 0.002, 0.0002])



def test_after_a_plateau_drop_the_schedule_waits_its_patience_again_before_the_next():
    s = train.Schedule(train.TrainConfig(shards=".", out=".", patience=2, max_drops=3))
    lrs = []
    for epoch in range(7):  # never better than the first epoch
        s.after_epoch(epoch, 0.9)
        lrs.append(s.lr)
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001, 0.00001])
def test_signal_at_an_epochs_last_batch_finishes_that_epoch_then_stops(prepped, tmp_path):
    cfg = train.TrainConfig(shards=prepped, out=tmp_path / "cut", epochs=2, device="cpu", **TINY)
    batches = len(Loader(build.loader_config(cfg, World(0, 1, 0, torch.device("cpu")), "train"), True))
    fed = []

    def signal_at_last_batch(images, labels):
        fed.append(1)
        if len(fed) == batches:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train.run(cfg, on_batch=signal_at_last_batch)["stopped"] == signal.SIGTERM
    ckpt = torch.load(cfg.out / train.CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and ckpt["ranks"][0]["loader"]["step"] == 0
    cfg.resume = True
    train.run(cfg)
    whole = tmp_path / "whole"
    train.run(train.TrainConfig(shards=prepped, out=whole, epochs=2, device="cpu", **TINY))
    losses = [[v for r in _records(d) for v in r["losses"]] for d in (cfg.out, whole)]
    assert len(losses[0]) == 2 * batches
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


def test_a_default_run_records_the_papers_recipe_and_refuses_another_on_resume(prepped, tmp_path):
    out = tmp_path / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=1, device="cpu", **TINY))
    config = json.loads((out / "config.json").read_text())
    assert config["mean"] == "pixel" and config["momentum_rule"] == "paper" and config["decay_biases"] is False
    assert config["init"] == "paper" and config["shard_shuffle"] is True
    ckpt = torch.load(out / train.CHECKPOINT, weights_only=True)
    assert ckpt["config"] == config
    decay = ckpt["optimizer"]["weight_decay"]
    assert decay["conv1.bias"] == decay["fc8.bias"] == 0.0 and decay["conv1.weight"] == decay["fc8.weight"] == 5e-4
    assert ckpt["optimizer"]["rule"] == "paper"
    for change, named in (({"width": 0.125}, "width"), ({"global_batch": 4}, "global_batch"),
                          ({"mean": "channel"}, "mean"), ({"decay_biases": True}, "decay_biases")):
        with pytest.raises(UserError, match=f"another recipe.*{named}"):
            train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, device="cpu", resume=True,
                                        **{**TINY, **change}))
    # what may change: the length, logging, threads
    done = train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, device="cpu", resume=True,
                                       **{**TINY, "log_every": 3}))
    assert done["epochs"] == 2


def test_eval_uses_the_mean_the_network_was_trained_with(prepped, tmp_path, capsys):
    from alexnet_pipeline import cli

    out = tmp_path / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=1, device="cpu", **{**TINY, "mean": "channel"}))
    capsys.readouterr()
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(out / train.CHECKPOINT), "--threads", "1",
                          "--batch-size", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean"] == "channel"


def test_tensorboard_gets_the_runs_scalars(prepped, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, device="cpu", **TINY))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/interval_images_per_s", "epoch/images_per_s", "epoch/val_top1_error",
            "epoch/lr"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_top1_error")] == [4, 8]  # after each epoch's 4 steps


def test_a_run_builds_each_loader_once(prepped, tmp_path, monkeypatch):
    from alexnet_pipeline import pipeline

    builds, real = [], pipeline.build_pipeline
    monkeypatch.setattr(pipeline, "build_pipeline", lambda cfg, train, *a, **k: builds.append(
        (cfg.split, train, cfg.tencrop)) or real(cfg, train, *a, **k))
    train.run(train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=3, device="cpu",
                                **{**TINY, "final_tencrop": True}))
    assert builds == [("val", False, False), ("train", True, False), ("val", False, True)]  # each once


class _Delayed:
    """The run's train loader, its batches held in memory and handed out after `delay` seconds each."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay
        self.batches = [(x.clone(), y.clone()) for x, y in loader]
        self.position = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for k, batch in enumerate(self.batches, 1):
            time.sleep(self.delay)
            self.position = k
            yield batch

    def state_dict(self):
        return self.loader.state_dict()


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_the_data_wait_is_high_for_a_slow_loader_and_low_for_a_fast_one(prepped, tmp_path, delay):
    """On the CPU the data wait is the host's time inside next(): a loader slowed on purpose shows it, one
    handing out batches from memory does not. An epoch not a multiple of --log-every logs every step once,
    and each epoch's figures (loss, images/s over its whole time) are made of its own steps, the second's too."""
    cfg = train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=2, device="cpu",
                            **{**TINY, "log_every": 3})
    trainer = train.Trainer(cfg)
    trainer.train_loader = _Delayed(trainer.train_loader, delay)
    trainer.fit()
    trainer.run.close()
    records, epochs = _records(tmp_path / "run"), _records(tmp_path / "run", "epoch")
    steps = len(trainer.train_loader)
    assert len(epochs) == 2
    for epoch in epochs:
        intervals = [r for r in records if r["epoch"] == epoch["epoch"]]
        assert steps % 3 and [len(r["losses"]) for r in intervals] == [3] * (steps // 3) + [steps % 3]
        losses = [v for r in intervals for v in r["losses"]]
        assert epoch["train_loss"] == pytest.approx(sum(losses) / steps)
        assert epoch["images_per_s"] == pytest.approx(steps * cfg.global_batch / epoch["seconds"])
    waits = [r["data_wait"] for r in records] + [e["data_wait"] for e in epochs]
    if delay:  # the delay's seconds show as waited, however long the steps take on a busy machine
        assert all(e["data_wait"] * e["seconds"] >= 0.8 * delay * steps for e in epochs), epochs
        assert all(w > 0.1 for w in waits), waits
    else:
        assert all(w < 0.2 for w in waits), waits
    assert [r["host_wait"] for r in records] == [r["data_wait"] for r in records]  # the CPU: the same
    for r in records:  # the run's ETA: the rest of this epoch, and whole epochs after it (none after the last)
        assert (r["eta_run_s"] == r["eta_epoch_s"]) == (r["epoch"] == 2), r


def test_the_epochs_train_error_is_per_sample(prepped, tmp_path):
    """A network that answers class 0 whatever it sees (fc8's bias far above its other outputs): its train
    top-1 error is exactly the share of the other classes' samples, the padding left out."""
    cfg = train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=1, device="cpu", **TINY)
    trainer = train.Trainer(cfg)
    with torch.no_grad():
        trainer.parts.net.fc8.bias[0] = 1e4
    trainer.fit()
    trainer.run.close()
    labels = [label for label, _ in read_samples(prepped, "train").values()]
    epoch, = _records(tmp_path / "run", "epoch")
    assert epoch["train_top1_error"] == pytest.approx(1 - labels.count(0) / len(labels))


def test_best_pt_holds_the_epoch_with_the_lowest_validation_error(prepped, tmp_path, monkeypatch):
    from alexnet_pipeline import evaluate
    from alexnet_pipeline.checkpoint import Checkpoint

    scripted = iter([0.5, 0.2, 0.4])  # epoch 2 is the best
    real = evaluate.errors
    monkeypatch.setattr(evaluate, "errors", lambda counts: {**real(counts), "top1_error": next(scripted)})
    out = tmp_path / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=3, device="cpu", **TINY))
    best, last = Checkpoint.load(out / train.BEST), Checkpoint.load(out / train.CHECKPOINT)
    assert (best.epoch, last.epoch) == (2, 3)
    assert not torch.equal(best.weights["fc8.weight"], last.weights["fc8.weight"])


def test_training_ends_with_its_summary(trained):
    from alexnet_pipeline.checkpoint import Checkpoint

    summary = json.loads((trained / train.SUMMARY).read_text())
    ckpt = Checkpoint.load(trained / train.CHECKPOINT)
    assert summary["epochs"] == ckpt.epoch == 2 and summary["steps"] == ckpt.step
    assert summary["center"]["val_top1_error"] == ckpt.history[-1]["val_top1_error"]


def test_the_train_command_exits_1_on_a_non_finite_loss_and_128_plus_a_signal(prepped, tmp_path, monkeypatch, capsys):
    from alexnet_pipeline import cli

    args = ["--shards", str(prepped), "--epochs", "1", "--width", "0.0625", "--global-batch", "8", "--threads", "1",
            "--device", "cpu", "--no-final-tencrop"]
    assert cli.train_main(args + ["--out", str(tmp_path / "a"), "--lr", "1e9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite at step" in err[0]
    monkeypatch.setattr(train, "run", lambda cfg, on_batch=None: {"stopped": signal.SIGTERM, "step": 3})
    assert cli.train_main(args + ["--out", str(tmp_path / "b")]) == 128 + signal.SIGTERM


# ---- data from a store, resumes on other numbers of ranks, and runs killed without warning -------------------

def test_a_run_from_a_store_ends_with_the_local_runs_weights_bit_for_bit(prepped, s3, tmp_path):
    from conftest import publish_to

    publish_to(s3.loopback, prepped, s3.url("data"))
    runs = {}
    for name, shards in (("local", prepped), ("store", s3.url("data"))):
        train.run(train.TrainConfig(shards=shards, out=tmp_path / name, epochs=2, device="cpu",
                                    cache_dir=tmp_path / "cache", **TINY))
        runs[name] = torch.load(tmp_path / name / train.CHECKPOINT, weights_only=True)
    for k, v in runs["local"]["weights"].items():
        assert torch.equal(v, runs["store"]["weights"][k]), k
    assert [h["train_loss"] for h in runs["local"]["history"]] == [h["train_loss"] for h in runs["store"]["history"]]


RANKS_RUN = """
import json, os, signal, sys
import torch
from alexnet_pipeline import train
from alexnet_pipeline.pipeline import PAD_LABEL
shards, out, stop_after, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rank, fed, seen = int(os.environ["RANK"]), [0], []
def on_batch(images, labels):
    seen.extend(labels[labels != PAD_LABEL].tolist())
    fed[0] += 1
    if fed[0] == stop_after and rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # rank 0 alone is signalled; the ranks agree to stop together
cfg = train.TrainConfig(shards=shards, out=out, epochs=1, device="cpu", width=0.0625, global_batch=6, log_every=1,
                        num_threads=1, final_tencrop=False, resume=True)
result = train.run(cfg, on_batch)
open(f"{record}.{rank}", "w").write(json.dumps({"seen": seen, "stopped": result.get("stopped", 0)}))
"""


def _torchrun(ranks: int, script, *args, env=None, timeout=300):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(ranks), str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_a_run_stopped_on_two_ranks_continues_on_one_and_on_three_seeing_each_sample_once(prepped, tmp_path):
    """Two ranks stop after 2 of the epoch's 4 steps (SIGTERM, saved mid-epoch); copies of the run continue on
    1 and on 3 ranks with the same global batch of 6: over the epoch every sample is trained on exactly once."""
    import shutil

    from conftest import numbered

    data = numbered(prepped, tmp_path / "data", [5, 7, 4, 8])  # 24 samples, 4 steps of 6
    script = tmp_path / "run.py"
    script.write_text(RANKS_RUN)
    _torchrun(2, script, data, tmp_path / "run", 2, tmp_path / "first")
    first = [json.loads((tmp_path / f"first.{r}").read_text()) for r in range(2)]
    assert [f["stopped"] for f in first] == [signal.SIGTERM] * 2
    before = first[0]["seen"] + first[1]["seen"]
    assert len(before) == 2 * 6 and len(set(before)) == 12
    for ranks in (1, 3):
        shutil.copytree(tmp_path / "run", tmp_path / f"on{ranks}")
        r = _torchrun(ranks, script, data, tmp_path / f"on{ranks}", 0, tmp_path / f"then{ranks}")
        after = sum((json.loads((tmp_path / f"then{ranks}.{k}").read_text())["seen"] for k in range(ranks)), [])
        assert sorted(before + after) == list(range(24)), ranks  # the split, each sample once
        log = (tmp_path / f"on{ranks}" / train.LOG).read_text()
        assert f"checkpoint from 2 ranks, now {ranks}: the data continues at step 2 of epoch 1" in log + r.stdout


def test_a_run_killed_at_random_points_and_resumed_ends_with_the_uninterrupted_weights(prepped, tmp_path):
    """SIGKILL (no handler runs) at random moments, mid-epoch and mid-checkpoint alike; each time the same command
    with --resume continues from the last checkpoint (saved every 2 steps). The weights at the end are the
    uninterrupted run's, bit for bit."""
    import random
    import subprocess

    args = ["--shards", str(prepped), "--epochs", "3", "--device", "cpu", "--width", "0.0625", "--global-batch", "8",
            "--log-every", "1", "--threads", "1", "--no-final-tencrop", "--checkpoint-every", "2", "--resume"]
    started = time.monotonic()
    subprocess.run(_cli(*args, "--out", tmp_path / "whole"), check=True, capture_output=True, timeout=300)
    whole = time.monotonic() - started  # the cuts scale with it: fixed ones missed on an idle machine
    rng, kills, started = random.Random(7), 0, time.monotonic()
    cut = tmp_path / "cut"
    while True:
        proc = subprocess.Popen(_cli(*args, "--out", cut), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.3, 0.6) * whole if kills < 4 else 300)
            break
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    assert kills >= 3 and time.monotonic() - started < 600  # it was cut, more than once
    a, b = (torch.load(d / train.CHECKPOINT, weights_only=True) for d in (tmp_path / "whole", cut))
    assert a["step"] == b["step"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


def test_a_store_gone_for_good_stops_training_in_one_line_and_keeps_the_last_checkpoint(prepped, s3, tmp_path):
    import subprocess

    from conftest import publish_to

    publish_to(s3.loopback, prepped, s3.url("data"))
    out = tmp_path / "run"
    args = ["--shards", s3.url("data"), "--out", out, "--device", "cpu", "--width", "0.0625", "--global-batch", "8",
            "--threads", "1", "--no-final-tencrop", "--cache-dir", tmp_path / "cache", "--storage-timeout", "3",
            "--streams", "1", "--shuffle-window", "1", "--read-ahead", "1"]
    subprocess.run(_cli(*args, "--epochs", "1"), check=True, capture_output=True, timeout=300)
    saved = (out / train.CHECKPOINT).read_bytes()
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(tmp_path / "cache")  # the next epoch must fetch again
    s3.loopback.down = True
    r = subprocess.run(_cli(*args, "--epochs", "2", "--resume"), capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"alexnet-train: {s3.url('data')}") and "gave up after retrying for 3 s" in lines[0]
    assert (out / train.CHECKPOINT).read_bytes() == saved
