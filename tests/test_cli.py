import json
import subprocess
import sys

import pytest

from alexnet_pipeline import cli


@pytest.mark.parametrize("argv", [["--bogus"], ["--shard-size", "0"], ["--splits", "test"], ["--quality", "101"],
                                  ["--imagenet-root", "x"], ["--layout", "zip"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.prep_main(argv)
    assert e.value.code == 2
    assert "alexnet-prep" in capsys.readouterr().err


def test_version_reports_pil_flavour_and_gpu(capsys):
    assert cli.prep_main(["--version"]) == 0
    out = capsys.readouterr().out
    assert "Pillow" in out and "GPU" in out and "nvidia-dali" in out


@pytest.mark.parametrize("main", ["train_main", "eval_main", "bench_main", "predict_main", "export_main"])
def test_every_command_has_help(main, capsys):
    with pytest.raises(SystemExit) as e:
        getattr(cli, main)(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: alexnet-")


def test_verify_exit_status(prepped, tmp_path, capsys):
    assert cli.prep_main(["--verify", str(prepped)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.prep_main(["--verify", str(tmp_path)]) == 1


def test_top_level_loaders_are_lazy():
    code = ("import sys, alexnet_pipeline as a; assert not any(m.startswith('nvidia.dali') for m in sys.modules); "
            "from alexnet_pipeline import train_loader, eval_loader; assert callable(train_loader)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own checks
        return e.code


@pytest.mark.parametrize("main,argv,named", [
    ("train_main", ["--shards", "x"], "--out"),
    ("train_main", ["--shards", "x", "--out", "y", "--epochs", "0"], "epochs"),
    ("train_main", ["--shards", "x", "--out", "y", "--schedule", "cosine"], "schedule"),
    ("train_main", ["--shards", "x", "--out", "y", "--width", "-1"], "width"),
    ("train_main", ["--shards", "x", "--out", "y", "--momentum-rule", "nesterov"], "momentum-rule"),
    ("train_main", ["--shards", "x", "--out", "y", "--column-devices", "cpu,cpu"], "column_devices"),
    ("eval_main", ["--shards", "x"], "--checkpoint"),
    ("bench_main", ["train", "--shards", "x", "--steps", "0"], "steps"),
    ("bench_main", ["train", "--shards", "x", "--feeds", "synthetic,dali-hwx"], "dali-hwx")])
def test_bad_training_flags_exit_2_naming_the_option(main, argv, named, capsys):
    assert _status(getattr(cli, main), argv) == 2
    err = capsys.readouterr().err
    assert named in err.strip().splitlines()[-1] and "Traceback" not in err


def test_bad_directories_and_checkpoints_exit_2_naming_them(prepped, tmp_path, capsys):
    assert cli.train_main(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err


def test_train_then_eval_prints_table_and_json(prepped, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.train_main(["--shards", str(prepped), "--out", str(run), "--epochs", "1", "--width", "0.0625",
                           "--global-batch", "8", "--threads", "1", "--no-final-tencrop", "--device", "cpu"]) == 0
    assert "epoch 1/1:" in capsys.readouterr().out
    ckpt = ["--shards", str(prepped), "--checkpoint", str(run / "checkpoint.pt"), "--threads", "1", "--batch-size", "4"]
    assert cli.eval_main(ckpt + ["--tencrop"]) == 0
    table = capsys.readouterr().out
    assert "center" in table and "tencrop" in table and "top-1 err" in table
    assert cli.eval_main(ckpt + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epoch"] == 1 and "tencrop" not in result and 0 <= result["center"]["top1_error"] <= 1
