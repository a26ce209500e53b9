"""The GPU round's plumbing, run on the CPU: the feed stage's commands and the record tools/feed_record.py
makes of them (its keys, and figures that come from the commands' own outputs)."""

import json
import statistics
import subprocess
import sys

from alexnet_pipeline import cli, train
from conftest import ROOT, _load_tool

feed_record = _load_tool("feed_record")


def test_the_feed_record_is_made_from_the_stages_outputs(prepped, tmp_path, capsys):
    common = ["--shards", str(prepped), "--device", "cpu", "--threads", "1", "--batch-size", "4", "--repeats", "1",
              "--steps", "3", "--json"]
    assert cli.bench_main(["loader", *common, "--axes", "batches_per_run"]) == 0
    (tmp_path / "loader.json").write_text(capsys.readouterr().out)
    assert cli.bench_main(["train", *common, "--width", "0.0625", "--feeds", "synthetic,dali"]) == 0
    (tmp_path / "bench.json").write_text(capsys.readouterr().out)
    train.run(train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=2, width=0.0625, global_batch=8,
                                num_threads=1, log_every=2, device="cpu", final_tencrop=False))
    (tmp_path / "two.txt").write_text("1 passed in 40.0s\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "feed_record.py"), "--shards", str(prepped),
                        "--loader", str(tmp_path / "loader.json"), "--bench", str(tmp_path / "bench.json"),
                        "--train-log", str(tmp_path / "run" / train.LOG), "--two-ranks", str(tmp_path / "two.txt"),
                        "--out", str(tmp_path / "feed.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "feed.json").read_text())
    assert {"commit", "gpu", "torch", "dali", "images", "bytes_per_image", "synthetic", "bench_real",
            "train_logged", "data_wait", "loader_alone", "two_ranks_test"} <= set(record)
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert record["synthetic"] == bench["images_per_s"]["synthetic"] and record["two_ranks_test"] == "passed"
    assert record["images"] == 31 and 10_000 < record["bytes_per_image"] < 40_000
    rows = [json.loads(line) for line in (tmp_path / "run" / train.LOG).read_text().splitlines()]
    first, later = ([r for r in rows if r["kind"] == "train" and (r["epoch"] == 1) == one] for one in (True, False))
    assert first and later  # the first epoch's intervals exist and are left out
    assert record["train_logged"] == statistics.median(r["images_per_s"] for r in later)
    assert record["data_wait"] == statistics.median(r["data_wait"] for r in later)
    assert [row["what"] for row in record["loader_alone"]].count("train") == 4


def test_the_step_and_prep_need_no_dali(tmp_path):
    """The GPU round runs prep and the synthetic step before DALI is installed there."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'nvidia': raise ImportError('no DALI here')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.path.insert(0, {str(ROOT / 'tools')!r})\n"
            "import torch, step_profile\n"
            "step = step_profile.step_for('+compile', torch.device('cpu'), 2)\n"
            "row = step(torch.randn(2, 3, 224, 224) * 50, torch.tensor([1, 3]))\n"
            "assert row.shape == (3,) and torch.isfinite(row).all()\n"
            "from alexnet_pipeline import cli\n"
            "cli.prep_main(['--help'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "usage: alexnet-prep" in r.stdout, r.stderr[-2000:]
