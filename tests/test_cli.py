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


@pytest.mark.parametrize("main", ["train_main", "eval_main", "bench_main"])
def test_every_command_has_help(main):
    r = subprocess.run([sys.executable, "-c", f"from alexnet_pipeline.cli import {main}; {main}(['--help'])"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout


def test_verify_exit_status(prepped, tmp_path, capsys):
    assert cli.prep_main(["--verify", str(prepped)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.prep_main(["--verify", str(tmp_path)]) == 1


def test_top_level_loaders_are_lazy():
    code = ("import sys, alexnet_pipeline as a; assert not any(m.startswith('nvidia.dali') for m in sys.modules); "
            "from alexnet_pipeline import train_loader, eval_loader; assert callable(train_loader)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
