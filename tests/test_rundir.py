"""The run directory under faults: what a killed run leaves, bad checkpoints and options, one-line errors."""

import json
import os
import shutil

import pytest
import torch

from alexnet_pipeline import cli, rundir, shards, train
from alexnet_pipeline.config import UserError

TINY = dict(width=0.0625, global_batch=8, log_every=1, num_threads=1, final_tencrop=False, device="cpu")
ARGS = ["--width", "0.0625", "--global-batch", "8", "--threads", "1", "--device", "cpu"]


def _steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / rundir.LOG).read_text().splitlines()) if r["kind"] == "train"]


def test_a_run_killed_before_its_first_checkpoint_is_redone_without_duplicate_log_lines(prepped, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what a SIGKILL after three logged steps and before the first checkpoint leaves behind
    (out / rundir.LOG).write_text("".join(json.dumps({"kind": "train", "step": s, "losses": [1.0]}) + "\n"
                                          for s in (1, 2, 3)))
    (out / rundir.CONFIG).write_text("{}")
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=1, resume=True, **TINY))
    steps = _steps(out)
    assert steps == sorted(set(steps)) and steps[0] == 1


def test_temporary_files_of_a_killed_checkpoint_write_are_removed(prepped, tmp_path):
    out = tmp_path / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=1, **TINY))
    (out / ".checkpoint.pt.tmp4242").write_bytes(b"\0" * 1000)  # a SIGKILL during torch.save
    (out / ".best.pt.tmp4242").write_bytes(b"\0" * 1000)
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, resume=True, **TINY))
    assert not list(out.glob(".*.tmp*"))


@pytest.mark.parametrize("main,extra", [("train_main", []), ("train_main", ["--resume"])])
def test_out_that_is_a_file_is_one_line(prepped, tmp_path, capsys, main, extra):
    (tmp_path / "f").write_text("x")
    assert getattr(cli, main)(["--shards", str(prepped), "--out", str(tmp_path / "f"), *ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not a directory" in err[0]


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (b"PK\x03\x04junk", "not a checkpoint"),
                                             (None, "not an alexnet-train checkpoint")])
def test_bad_checkpoints_are_one_line_for_eval_and_resume(prepped, tmp_path, capsys, content, message):
    out = tmp_path / "run"
    out.mkdir()
    if content is not None:
        (out / rundir.CHECKPOINT).write_bytes(content)
    else:  # a checkpoint the model config lacks: not written by alexnet-train
        torch.save({"model": {}, "epoch": 1}, out / rundir.CHECKPOINT)
    status = cli.train_main(["--shards", str(prepped), "--out", str(out), "--resume", *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0]
    status = cli.eval_main(["--shards", str(prepped), "--checkpoint", str(out / rundir.CHECKPOINT), "--threads", "1",
                            "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and str(out / rundir.CHECKPOINT) in err[0] and message in err[0]


def test_resume_with_another_variant_is_one_line(prepped, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.train_main(["--shards", str(prepped), "--out", str(out), "--epochs", "1", "--no-final-tencrop",
                           *ARGS]) == 0
    capsys.readouterr()
    assert cli.train_main(["--shards", str(prepped), "--out", str(out), "--epochs", "2", "--resume",
                           "--variant", "torchvision", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another recipe (variant 'paper' -> 'torchvision')" in err[0]


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_a_damaged_stats_file_is_named(prepped, tmp_path, content):
    from alexnet_pipeline.pipeline import train_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    if content is None:  # a real npz without the statistics
        shards.save_npz(copy / shards.STATS, {"other": torch.zeros(3).numpy()})
    else:
        (copy / shards.STATS).write_bytes(content)
    with pytest.raises(shards.ShardError, match="stats.npz: not a statistics file"):
        train_loader(copy, batch_size=4, num_threads=1)
    assert any("stats.npz" in p for p in shards.verify(copy))


def test_a_damaged_shard_of_the_right_size_is_named(prepped, tmp_path):
    from alexnet_pipeline.pipeline import eval_loader

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    shard = shards.shard_paths(copy, "val")[1]
    data = bytearray(shard.read_bytes())
    start = data.index(b"\xff\xd8\xff")  # the first JPEG's start-of-image marker: no decoder can read past it
    data[start:start + 3] = b"\0\0\0"
    kept = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # damage that keeps the time (a disk's, not a user's)
    with pytest.raises(shards.ShardError) as e:
        for _ in eval_loader(copy, batch_size=4, num_threads=1):
            pass
    # named by DALI's failure or, first, by the background digest: the shard, and the sample that does not decode
    first = next(shards.iter_samples(bytes(data))).key
    assert str(e.value).startswith(f"{shard}: ") and "sha256" in str(e.value)
    assert f"sample {first} does not decode" in str(e.value)


def test_a_bug_keeps_its_traceback(prepped, tmp_path, monkeypatch):
    def broken(cfg, on_batch=None):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(train, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.train_main(["--shards", str(prepped), "--out", str(tmp_path / "run"), *ARGS])
    with pytest.raises(UserError):  # while a user's mistake is a UserError, which the CLI prints as one line
        train.TrainConfig(shards=prepped, out=tmp_path, lr=-1.0)


def test_a_resume_keeps_the_log_up_to_the_checkpoints_step_and_only_a_resuming_rank_reads_the_checkpoint(
        trained, tmp_path):
    """Lines a run logged after its last checkpoint (then died) are dropped on resume: the resumed run logs
    those steps again. Ranks other than 0 read the checkpoint only when resuming."""
    from alexnet_pipeline.checkpoint import Checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = Checkpoint.load(run / rundir.CHECKPOINT, resumable=True).step
    kept = (run / rundir.LOG).read_text()
    assert step > 2 and _steps(run)[-1] == step
    with open(run / rundir.LOG, "a") as f:
        f.writelines(json.dumps({"kind": "train", "step": s, "losses": [1.0]}) + "\n" for s in (step + 1, step + 2))
    assert rundir.RunDir(run, main=False).start(resume=False) is None
    assert rundir.RunDir(run, main=False).start(resume=True).step == step
    assert (run / rundir.LOG).read_text().count("\n") == kept.count("\n") + 2  # the other ranks write nothing
    main = rundir.RunDir(run)
    assert main.start(resume=True).step == step
    main.close()
    assert (run / rundir.LOG).read_text() == kept
