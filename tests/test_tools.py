"""The GPU round's plumbing, run on the CPU: the feed stage's commands and the record tools/feed_record.py
makes of them (its keys, and figures that come from the commands' own outputs)."""

import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT, _load_tool

from alexnet_pipeline import cli, environment, train

feed_record = _load_tool("feed_record")


def _record(prepped, tmp_path, **inputs):
    args = [sys.executable, str(ROOT / "tools" / "feed_record.py"), "--shards", str(prepped), "--out",
            str(tmp_path / "feed.json"), "--commit", "0123abc"]
    for name, path in inputs.items():
        args += [f"--{name.replace('_', '-')}", str(path)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "feed.json").read_text())


def test_the_feed_record_is_made_from_the_stages_outputs(prepped, tmp_path, capsys):
    common = ["--shards", str(prepped), "--device", "cpu", "--threads", "1", "--batch-size", "4", "--repeats", "1",
              "--steps", "3"]
    assert cli.bench_main(["loader", *common, "--axes", "batches_per_run",
                           "--record", str(tmp_path / "loader.json")]) == 0
    assert cli.bench_main(["train", *common, "--width", "0.0625", "--feeds", "synthetic,dali", "--json"]) == 0
    # DALI may print to stdout before the JSON object
    (tmp_path / "bench.json").write_text("DALI: {a line with braces}\n" + capsys.readouterr().out)
    train.run(train.TrainConfig(shards=prepped, out=tmp_path / "run", epochs=2, width=0.0625, global_batch=8,
                                num_threads=1, log_every=2, device="cpu", final_tencrop=False))
    (tmp_path / "two.txt").write_text("..\n1 passed in 40.0s\n")
    record = _record(prepped, tmp_path, loader=tmp_path / "loader.json", bench=tmp_path / "bench.json",
                     train_log=tmp_path / "run" / train.LOG, two_ranks=tmp_path / "two.txt")
    assert record["missing"] == ["step_alone", "ceiling", "gpu_tests", "feed_data"]
    bench = feed_record.read_json(tmp_path / "bench.json")
    rates = bench["images_per_s"]
    assert rates["synthetic"] != rates["dali"]  # so that a swap below would show
    assert (record["synthetic"], record["bench_real"]) == (rates["synthetic"], rates["dali"])
    env = environment.report()
    assert (record["gpu"], record["torch"], record["dali"]) == (env["GPU"], env["torch"], env["nvidia-dali"])
    assert record["torch"] == torch.__version__ and record["commit"] == "0123abc"
    assert record["two_ranks_test"] == "passed"
    n_train = json.loads((prepped / "dataset.json").read_text())["splits"]["train"]["samples"]
    sizes = [m.size for p in sorted((prepped / "train").glob("*.tar")) for m in tarfile.open(p)
             if m.name.endswith(".jpg")]
    assert record["images"] == n_train and record["bytes_per_image"] == sum(sizes) / len(sizes)
    rows = [json.loads(line) for line in (tmp_path / "run" / train.LOG).read_text().splitlines()]
    later = [r for r in rows if r["kind"] == "epoch" and r["epoch"] > 1]
    assert len(later) == 1  # the first epoch (compiling, a cold page cache) is left out
    assert record["train_logged"] == statistics.median(r["images_per_s"] for r in later)
    assert record["data_wait"] == statistics.median(r["data_wait"] for r in later)
    assert record["host_wait"] == statistics.median(r["host_wait"] for r in later)
    assert record["fed_over_synthetic"] == record["train_logged"] / record["synthetic"]
    assert [row["what"] for row in record["loader_alone"]].count("train") == 5


def test_a_record_from_partial_outputs_keeps_what_exists_and_names_what_is_missing(prepped, tmp_path):
    """A round cut short: the loader table timed out before its first row, the bench file was cut off mid-write,
    the train log's last line is half a line, and the two-ranks test failed."""
    (tmp_path / "loader.json").write_text("")
    (tmp_path / "bench.json").write_text('{"images_per_s": {"synthetic": 2')
    rows = [{"kind": "epoch", "epoch": e, "images_per_s": r, "data_wait": w, "host_wait": w + 0.5}
            for e, r, w in ((1, 10.0, 0.5), (2, 30.0, 0.1), (3, 50.0, 0.3), (4, 40.0, 0.2))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    (tmp_path / "two.txt").write_text("F\n1 failed, 1 passed in 40.0s\n")
    record = _record(prepped, tmp_path, loader=tmp_path / "loader.json", bench=tmp_path / "bench.json",
                     train_log=tmp_path / "log.jsonl", two_ranks=tmp_path / "two.txt",
                     feed_data=tmp_path / "absent.json")
    assert record["train_logged"] == 40.0 and record["data_wait"] == 0.2  # epochs 2 to 4, not 1
    assert record["host_wait"] == 0.7 and record["two_ranks_test"] == "failed"
    assert set(record["missing"]) == {"synthetic", "bench_real", "bench_feeds", "loader_alone", "feed_data",
                                      "step_alone", "ceiling", "gpu_tests", "fed_over_synthetic"}
    assert record["images"] > 0
    (tmp_path / "two.txt").write_text("1 skipped, 6 deselected in 1.5s\n")
    assert _record(prepped, tmp_path, two_ranks=tmp_path / "two.txt")["two_ranks_test"] == "skipped"
    assert _record(prepped, tmp_path)["two_ranks_test"] == "not run"


def test_the_record_names_what_keeps_the_feed_below_the_goal():
    loader = [{"what": "train", "images_per_s": 900.0}, {"what": "train", "images_per_s": 1100.0}]
    ceiling = [{"what": "decode", "images_per_s": 1200.0}, {"what": "read", "draws": "host", "images_per_s": 5000.0},
               {"what": "read", "draws": "dali", "images_per_s": 100.0}]
    base = {"synthetic": 2000.0, "loader_alone": loader, "ceiling": ceiling, "data_wait": 0.3, "host_wait": 0.6}
    assert feed_record.limit({**base, "train_logged": 1950.0}) is None  # at the goal
    slow = feed_record.limit({**base, "train_logged": 1000.0})
    assert slow == ("the loader alone: at best 1,100 images/s, below the step's 2,000; the slowest of its parts: "
                    "decoding (decoding 1,200, the CPU side 5,000)")  # the DALI draws' read row is not the default
    fast = feed_record.limit({**base, "synthetic": 1000.0, "train_logged": 800.0})
    assert fast.startswith("the loader alone keeps up (1,100") and "data wait 30%, host 60%" in fast


def test_the_feed_rounds_boxes_fit_its_call_and_the_round_its_budget():
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--plan"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    used, allowed = map(int, re.search(r"call 3: (\d+) s of boxes and grace, at most (\d+) s", r.stdout).groups())
    assert used <= allowed == 540  # 90% of the 600 s a device call may run
    parts = re.search(r"round: start (\d+) \+ calls 1-2 (\d+) \+ call 3 (\d+) \+ back (\d+) = (\d+) s of 780 s",
                      r.stdout).groups()
    assert sum(map(int, parts[:4])) == int(parts[4]) <= 13 * 60 and int(parts[2]) == used
    over = (ROOT / "tools" / "gpu_check.sh").read_text().replace("[loader]=50", "[loader]=150")
    (script := ROOT / "build" / "gpu_check_over.sh").parent.mkdir(exist_ok=True)
    script.write_text(over)
    r = subprocess.run(["bash", str(script), "--plan"], capture_output=True, text=True)
    assert r.returncode == 1 and "the boxes of call 3 exceed 90% of its limit" in r.stderr


NO_DALI = '''
import importlib.abc, os, sys

class NoDali(importlib.abc.MetaPathFinder):
    """This interpreter has no DALI until the round installs it into $SITE (the GPU machine has none)."""
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "nvidia" and not os.path.isdir(os.path.join(os.environ.get("SITE", ""), "nvidia")):
            raise ImportError("no DALI on this machine yet")

sys.meta_path.insert(0, NoDali())
'''


def _bundle(where, content):
    """A fake three-piece bundle of a site/ holding `content` ({name: target of a link}), with its SHA256SUMS."""
    site = where / "src" / "site"
    site.mkdir(parents=True)
    for name, target in content.items():
        (site / name).symlink_to(target)
    packed = subprocess.run(f"tar -cf - -C {where / 'src'} site | xz -1", shell=True, capture_output=True).stdout
    third = -(-len(packed) // 3)
    for k in range(3):
        (where / f"site.tar.xz.{k}").write_bytes(packed[k * third:(k + 1) * third])
    subprocess.run("sha256sum site.tar.xz.* > SHA256SUMS", shell=True, cwd=where, check=True)
    return where


def test_the_feed_round_runs_as_its_three_calls_on_tiny_data(tmp_path):
    """The GPU round's three calls, on the CPU with tiny sizes, as the device would run them: $OUT empty at every
    call and at most 8 files back; an interpreter without DALI until call 3 installs it from a three-piece
    bundle; a cold machine, a damaged piece and a failed install each stop in seconds, naming the problem;
    then every command ends inside its box (the GPU round's, times BOX_SCALE=4 for this busy 2-core CPU) and
    the record is whole, in $OUT and at the end of the output."""
    import nvidia

    (tmp_path / "nodali").mkdir()
    (tmp_path / "nodali" / "sitecustomize.py").write_text(NO_DALI)
    base = {**os.environ, "DEVICE": "cpu", "FEED_CLASSES": "3", "FEED_TRAIN": "10", "FEED_VAL": "2", "WIDTH": "0.0625",
            "BATCH": "4", "STEPS": "2", "REPEATS": "1", "EPOCHS": "2", "MAKERS": "2", "COMMIT": "0123abc",
            "BOX_SCALE": "4",
            "PY": sys.executable, "PYTHONPATH": str(tmp_path / "nodali")}
    script = ["bash", str(ROOT / "tools" / "gpu_check.sh")]

    def call(name, args, bundle, machine, timeout=60):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        env = {**base, "OUT": str(out), "BUNDLE": str(bundle), "WHEELS": str(machine / "wheels"),
               "SITE": str(machine / "site"), "WORK": str(machine / "work")}
        t0 = time.monotonic()
        r = subprocess.run(script + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        assert len(list(out.iterdir())) <= 8
        return r, time.monotonic() - t0, out

    assert subprocess.run([sys.executable, "-c", "import nvidia.dali"], env=base, capture_output=True).returncode
    bundle = _bundle(tmp_path / "bundle", {"nvidia": str(Path(nvidia.__path__[0]))})
    r, seconds, _ = call("cold", ["round"], bundle, tmp_path / "cold")
    assert r.returncode == 3 and "SHA256SUMS is not on this machine" in r.stderr and seconds < 30
    r, _, _ = call("skipped", ["carry", "1"], bundle, tmp_path / "cold")
    assert r.returncode == 3 and "piece 0 is not on this machine" in r.stderr
    damaged = tmp_path / "damaged"
    for n in (0, 1):
        assert call(f"d{n}", ["carry", str(n)], bundle, damaged)[0].returncode == 0
    piece = damaged / "wheels" / "site.tar.xz.1"
    piece.write_bytes(piece.read_bytes()[:-1] + b"x")
    r, seconds, _ = call("d3", ["round"], bundle, damaged)
    assert r.returncode == 3 and "site.tar.xz.1 (sha256 differs)" in r.stderr and seconds < 30
    empty = _bundle(tmp_path / "empty", {"nothing": "/nonexistent"})
    for n in (0, 1):
        call(f"e{n}", ["carry", str(n)], empty, tmp_path / "broken")
    r, seconds, _ = call("e3", ["round"], empty, tmp_path / "broken")
    assert r.returncode == 4 and "install: exit 4" in r.stdout and seconds < 60
    machine = tmp_path / "machine"
    for n in (0, 1):
        r, seconds, out = call(str(n), ["carry", str(n)], bundle, machine)
        assert r.returncode == 0 and seconds < 10 and not list(out.iterdir()), r.stderr
    r, _, out = call("3", ["round"], bundle, machine, timeout=600)
    ends = dict(re.findall(r"^([a-z-]+): exit (\d+) after", r.stdout, re.M))
    assert ends == dict.fromkeys(["check", "install", "data", "step", "train", "bench", "loader", "ceiling",
                                  "two-ranks", "gpu-test"], "0"), r.stdout[-3000:] + r.stderr[-2000:]
    record = json.loads((out / "h200_feed.json").read_text())
    assert record["missing"] == [] and record["commit"] == "0123abc", record["missing"]
    assert json.loads(r.stdout[r.stdout.rindex("\n{") + 1:]) == record  # printed last: the output tail has it
    assert {p.name for p in out.iterdir()} == {"h200_feed.json", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as tf:
        assert {"logs/train.txt", "raw/bench.json", "raw/step.json"} <= set(tf.getnames())
    assert record["two_ranks_test"] == record["gpu_tests"] == ("passed" if torch.cuda.is_available() else "skipped")


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


def test_the_sample_makers_photos_prepare_to_imagenets_bytes_and_shapes():
    """alexnet-prep's q95 JPEGs of the maker's sources average within 10% of real ImageNet train photographs
    prepared the same way (31.7 KiB, measured on 1,000 of them); the sources vary in size as ImageNet's do."""
    from PIL import Image

    from alexnet_pipeline.image import prepare

    maker = _load_tool("make_sample_imagenet")
    sizes, shapes, grey = [], [], 0
    for label in range(10):
        rng = np.random.default_rng([0, label])
        for _ in range(15):
            source = maker.source_jpeg(rng, label, 10)
            with Image.open(io.BytesIO(source)) as im:
                shapes.append(im.size)
                grey += im.mode == "L"
            sizes.append(len(prepare(source)[0]))
    assert abs(np.mean(sizes) / (31.7 * 1024) - 1) < 0.10, np.mean(sizes) / 1024
    short, long = np.min(shapes, axis=1), np.max(shapes, axis=1)
    assert np.median(long) == 500 and np.median(short) == 375
    assert short.min() < 120 and long.max() > 1200 and 0 < grey < len(sizes) * 0.1
    again = maker.source_jpeg(np.random.default_rng([0, 3]), 3, 10)
    assert again == maker.source_jpeg(np.random.default_rng([0, 3]), 3, 10)  # deterministic from the seed


def test_the_scale_check_builds_a_tree_of_links_and_reports_a_watched_run(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "scale_check.py")]
    made = subprocess.run(tool + ["make", str(tmp_path / "tree"), "--classes", "3", "--train-per-class", "70",
                                  "--val-per-class", "2", "--distinct", "4"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    jpegs = sorted((tmp_path / "tree" / "train").rglob("*.JPEG"))
    assert len(jpegs) == 210 and len({os.stat(p).st_ino for p in jpegs}) <= 4  # links to 4 distinct files
    record = tmp_path / "scale.json"
    r = subprocess.run(tool + ["run", str(tmp_path / "tree"), str(tmp_path / "out"), "--workers", "2", "--nofile",
                               "64", "--repeats", "1", "--verify", "--record", str(record), "--every", "0.02"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(record.read_text())
    stages = result["prep"]["stages"]
    assert stages["listing"]["count"] == 216 and stages["train images"]["count"] == 210
    assert stages["train shards"]["count"] == 1 and stages["train images"]["per_second"] > 0
    peaks = result["prep"]["peaks"]
    assert peaks["workers_seen"] >= 2 and 0 < peaks["worker_pss_mib"] <= peaks["worker_rss_mib"]
    assert 0 < peaks["worker_open_files"] < 64 and peaks["parent_pss_mib"] > 0
    assert result["nothing_to_do"]["ratio"] > 0 and result["verify"]["exit"] == 0
