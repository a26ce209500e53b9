"""The checkpoint's one owner: what it writes loads, what it did not write (or not all of) is one line."""

import dataclasses
import errno
import shutil
import subprocess
import sys
import time

import pytest
import torch

from alexnet_pipeline import cli, train
from alexnet_pipeline.checkpoint import FORMAT, Checkpoint
from alexnet_pipeline.config import UserError, option, recipe_fields

TINY = dict(width=0.0625, global_batch=8, log_every=1, num_threads=1, final_tencrop=False, device="cpu")
ARGS = ["--width", "0.0625", "--global-batch", "8", "--threads", "1", "--device", "cpu", "--no-final-tencrop"]


@pytest.fixture(scope="module")
def run_dir(prepped, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=1, **TINY))
    return out


def test_a_checkpoint_round_trips_and_holds_plain_values_only(run_dir, tmp_path):
    ckpt = Checkpoint.load(run_dir / train.CHECKPOINT, resumable=True)
    raw = torch.load(run_dir / train.CHECKPOINT, weights_only=True)  # no pickled classes
    assert raw["format"] == FORMAT and set(raw["weights"]) == set(ckpt.weights)
    ckpt.save(tmp_path / "again.pt")
    again = Checkpoint.load(tmp_path / "again.pt", resumable=True)
    assert again.epoch == ckpt.epoch == 1 and again.classes == ckpt.classes and again.class_names == ckpt.class_names
    assert all(torch.equal(again.weights[k], v) for k, v in ckpt.weights.items())
    assert again.preprocessing["mean"] == "pixel" and again.mean_to_subtract().shape == (224, 224, 3)
    assert {"momentum", "rule"} <= set(raw["optimizer"]) and {"drops", "bad"} <= set(raw["schedule"])  # not crossed
    assert again.training.schedule == ckpt.training.schedule
    momentum = again.training.optimizer["momentum"]
    assert momentum.keys() == ckpt.training.optimizer["momentum"].keys() and \
        all(torch.equal(v, ckpt.training.optimizer["momentum"][k]) for k, v in momentum.items())
    best = Checkpoint.load(run_dir / train.BEST)
    assert best.training is None and ckpt.training is not None


def test_best_pt_given_to_resume_is_one_line_naming_what_it_lacks(prepped, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    shutil.copy(out / train.BEST, out / train.CHECKPOINT)
    assert cli.train_main(["--shards", str(prepped), "--out", str(out), "--epochs", "2", "--resume", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the weights only (it lacks optimizer, schedule, ranks" in err[0]
    # the same file evaluates
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(out / train.CHECKPOINT), "--device", "cpu",
                          "--threads", "1", "--batch-size", "4", "--json"]) == 0


def test_a_checkpoint_continues_only_on_its_classes_in_their_order(run_dir):
    """Labels are class positions: the same classes in another order would train every image as another."""
    ckpt = Checkpoint.load(run_dir / train.CHECKPOINT, resumable=True)
    ckpt.check_run(list(ckpt.classes), ckpt.config, {}, "SHARDS")
    with pytest.raises(UserError, match="trained on other classes than SHARDS holds"):
        ckpt.check_run(list(reversed(ckpt.classes)), ckpt.config, {}, "SHARDS")


def test_a_plain_load_keeps_a_checkpoints_training_state_and_a_best_pt_has_none(run_dir):
    assert Checkpoint.load(run_dir / train.CHECKPOINT).training is not None
    assert Checkpoint.load(run_dir / train.BEST).training is None


def test_a_checkpoint_from_a_newer_version_is_refused_naming_it(run_dir, tmp_path):
    raw = torch.load(run_dir / train.BEST, weights_only=True)
    raw["format"] = FORMAT + 1
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(UserError, match=f"newer alexnet-pipeline \\(checkpoint format {FORMAT + 1}"):
        Checkpoint.load(tmp_path / "future.pt")


def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_stays(run_dir, tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError ('unexpected pos'); it is a disk error all the same."""
    ckpt = Checkpoint.load(run_dir / train.CHECKPOINT, resumable=True)
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path)
    before = path.read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import alexnet_pipeline.files as files
    monkeypatch.setattr(files, "open", lambda p, mode="r", *a: Full(real_open(p, mode, *a)), raising=False)
    with pytest.raises(UserError, match="checkpoint.pt: cannot write \\(No space left on device\\); the previous"):
        ckpt.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp*"))
    Checkpoint.load(path, resumable=True)


def test_a_real_full_disk_while_saving_is_one_line(run_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(UserError, match="cannot write \\(No space left on device\\)"):
            Checkpoint.load(run_dir / train.CHECKPOINT, resumable=True).save(mount / "checkpoint.pt")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_second_train_on_the_same_out_is_refused_naming_the_first(prepped, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", "import sys; from alexnet_pipeline.cli import train_main; "
                              "sys.exit(train_main())", "--shards", str(prepped), "--out", str(out), "--epochs", "50",
                              *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-c", "import sys; from alexnet_pipeline.cli import train_main; "
                                 "sys.exit(train_main())", "--shards", str(prepped), "--out", str(out), "--resume",
                                 *ARGS], capture_output=True, text=True, timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"in use by another alexnet-train (pid {first.pid})" in lines[0]
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("flag,value,named", [("--device", "nonsense", "option device: must be auto, cpu, cuda"),
                                              ("--lr", "nan", "option lr: must be a finite number"),
                                              ("--lr", "inf", "option lr: must be a finite number"),
                                              ("--lr", "0", "option lr: must be positive"),
                                              ("--momentum", "nan", "option momentum: must be a finite number"),
                                              ("--lighting-sigma", "-inf", "option lighting_sigma")])
def test_bad_values_are_refused_before_any_work(prepped, tmp_path, capsys, flag, value, named):
    out = tmp_path / "run"
    assert cli.train_main(["--shards", str(prepped), "--out", str(out), *ARGS, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and not out.exists()


def test_a_checkpoint_from_before_a_recipe_option_existed_resumes_with_its_default(prepped, run_dir, tmp_path,
                                                                                  monkeypatch):
    """A recipe option added after a checkpoint was written (here: a TrainConfig that declares one more)
    leaves that checkpoint resumable while the run uses the option's default, and refused when it does not."""

    @dataclasses.dataclass(kw_only=True)
    class Newer(train.TrainConfig):
        label_smoothing: float = option(0.0, "a recipe option added later", minimum=0.0, recipe=True)

    monkeypatch.setattr(train, "RECIPE", recipe_fields(Newer))
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    ckpt = Checkpoint.load(out / train.CHECKPOINT, resumable=True)
    assert "label_smoothing" not in ckpt.config
    del ckpt.config["decay_biases"]  # and one this version has, missing as from a version before it
    ckpt.save(out / train.CHECKPOINT)
    assert train.run(Newer(shards=prepped, out=out, epochs=2, resume=True, **TINY))["epochs"] == 2
    with pytest.raises(UserError, match=r"another recipe \(label_smoothing 0.0 -> 0.1\)"):
        train.run(Newer(shards=prepped, out=out, epochs=3, resume=True, label_smoothing=0.1, **TINY))


def test_each_rank_continues_from_its_own_loader_state_and_another_number_of_ranks_from_the_global_position():
    """Saved by 2 ranks: on 2, each rank gets its own state (DALI's draws state included); on 1 or 3, every rank
    gets the global position without DALI's state (another rank's would replay another rank's draws)."""
    from alexnet_pipeline.checkpoint import Checkpoint, RankState, TrainingState

    states = [{"epoch": 3, "step": 5, "global_batch": 8, "world_size": 2, "dali": f"rank {r}"} for r in range(2)]
    ranks = [RankState(s, torch.zeros(1)) for s in states]
    ckpt = Checkpoint({}, {}, {}, [], {}, {}, epoch=3, step=50, training=TrainingState({}, {}, ranks))
    assert [ckpt.loader_state(r, 2) for r in range(2)] == states
    position = {"epoch": 3, "step": 5, "global_batch": 8, "world_size": 2}
    assert [ckpt.loader_state(r, 3) for r in range(3)] == [position] * 3
    assert ckpt.loader_state(0, 1) == position
    assert Checkpoint({}, {}, {}, [], {}, {}, epoch=0, step=0).loader_state(0, 1) is None
    # the generators (dropout's, the step's) are a rank's own: on another number of ranks none is handed over
    assert [ckpt.rank_state(r, 2) for r in range(2)] == ranks
    assert [ckpt.rank_state(r, 3) for r in range(3)] == [None] * 3 and ckpt.rank_state(0, 1) is None


def test_a_checkpoint_of_the_previous_format_evaluates_but_does_not_resume(run_dir, tmp_path):
    """Format 3 held DALI's reader state as its data position: its weights load, a --resume is refused."""
    raw = torch.load(run_dir / train.CHECKPOINT, weights_only=True)
    raw["format"] = FORMAT - 1
    torch.save(raw, tmp_path / "older.pt")
    assert Checkpoint.load(tmp_path / "older.pt").epoch == 1
    with pytest.raises(UserError, match=r"older alexnet-pipeline \(format 3\).* not resumed"):
        Checkpoint.load(tmp_path / "older.pt", resumable=True)
