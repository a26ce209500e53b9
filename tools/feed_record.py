#!/usr/bin/env python3
"""The machine-written record of a feed measurement (tools/gpu_check.sh, the third call of the feed round):

    python tools/feed_record.py --shards SHARDS --out h200_feed.json [--loader loader.json] [--ceiling c.json]
        [--bench bench.json] [--train-log log.jsonl] [--step step.json] [--two-ranks two_ranks.txt]
        [--gpu-tests gpu_tests.txt] [--feed-data feed_data.json] [--commit SHA]

reads whatever the round's commands have written so far (alexnet-bench loader/train --record files,
alexnet-train's RUN/log.jsonl, tools/step_profile.py's record, the pytest outputs of the GPU tests, the feed
set's timings) and prints one JSON object to --out. gpu_check.sh writes it again after every command, so a
round cut short still leaves a record of what it measured; an input that is missing, empty or cut off leaves
its keys null and named under `missing`:

    commit, gpu, torch, dali            what ran (gpu, torch and dali read on the machine that writes this)
    images, bytes_per_image             the train split measured, JPEG bytes per image
    step_alone                          tools/step_profile.py's compiled step (it ran beside the making of the set)
    synthetic, bench_real               alexnet-bench train: the step alone, and fed by the default DALI loader
    train_logged, data_wait, host_wait  alexnet-train: medians over its epochs after the first of the epoch's
                                        images/s (its images over its wall time) and data wait (the GPU's idle
                                        share between steps; the host's share inside next() beside it)
    fed_over_synthetic                  train_logged / synthetic (the goal: 0.95)
    loader_alone, ceiling               alexnet-bench loader's train rows; decoding alone and the CPU side
    limit                               when below the goal, what limits it, read off the figures above
    two_ranks_test, gpu_tests           passed, failed, skipped or not run
    feed_data                           the feed set's sample-maker and prep seconds

docs/results.md's GPU figures are made from it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet_pipeline import environment, shards  # noqa: E402
from alexnet_pipeline.config import UserError  # noqa: E402


def read_json(path: Path | None) -> dict | None:
    """The JSON object in `path`: the first line starting with '{' from which one parses (DALI may print to
    stdout before it, braces included); None if the file is missing, empty or cut off."""
    try:
        text = path.read_text() if path is not None else ""
    except FileNotFoundError:
        return None
    for start in (m.start() for m in re.finditer(r"^\{", text, re.M)):
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    return None


def jpeg_bytes_per_image(shards_dir: Path) -> float:
    """Mean size of the train split's JPEG members (the images themselves, not the tar headers)."""
    sizes = []
    for path in shards.shard_paths(shards_dir, "train"):
        with tarfile.open(path) as tf:
            sizes += [m.size for m in tf if m.name.endswith(".jpg")]
    return statistics.mean(sizes)


def epochs_after_the_first(log: Path | None) -> dict:
    """Medians over alexnet-train's epochs after the first (compiling, filling the page cache) of each epoch's
    images/s, data wait and host wait; {} when there is no such epoch yet."""
    if log is None or not log.exists():
        return {}
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a time-out ends what can be read
    later = [r for r in rows if r.get("kind") == "epoch" and r["epoch"] > 1]
    return {k: statistics.median(r[k] for r in later) for k in ("images_per_s", "data_wait", "host_wait")} \
        if later else {}


def limit(result: dict) -> str | None:
    """What keeps the fed rate below 0.95x the step alone, from the record's own figures; None at the goal or
    when the figures are not there."""
    fed, step = result.get("train_logged"), result.get("synthetic")
    if fed is None or step is None or fed >= 0.95 * step:
        return None
    train_rows = [r for r in result.get("loader_alone") or [] if r.get("what") == "train"]
    parts = {}
    for r in result.get("ceiling") or []:
        if r["what"] == "decode" or (r["what"] == "read" and r.get("draws") == "host"):
            parts["decoding" if r["what"] == "decode" else "the CPU side"] = r["images_per_s"]
    best = max((r["images_per_s"] for r in train_rows), default=None)
    if best is None:
        return f"fed {fed:,.0f} against {step:,.0f} images/s; no loader table to say why"
    if best < step:
        slowest = min(parts.items(), key=lambda kv: kv[1])[0] if parts else "not measured"
        return (f"the loader alone: at best {best:,.0f} images/s, below the step's {step:,.0f}; the slowest of its "
                f"parts: {slowest} ({', '.join(f'{k} {v:,.0f}' for k, v in parts.items())})")
    return (f"the loader alone keeps up ({best:,.0f} images/s against the step's {step:,.0f}): copies or waits "
            f"(data wait {result.get('data_wait') or 0:.0%}, host {result.get('host_wait') or 0:.0%})")


def pytest_outcome(path: Path | None) -> str:
    """pytest's summary line: passed, failed, skipped, or not run."""
    text = path.read_text() if path is not None and path.exists() else ""
    summary = [line for line in text.splitlines() if " in " in line and any(
        w in line for w in (" passed", " failed", " skipped", " error"))]
    if not summary:
        return "not run"
    last = summary[-1]
    if " failed" in last or " error" in last:
        return "failed"
    return "passed" if " passed" in last else "skipped"


def commit_of_tree(given: str | None) -> str:
    """The commit measured: given (the round's command names it; the GPU machine may have no git), else git's."""
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    return out.strip() or "unknown"


def record(shards_dir: Path, *, loader: dict | None, bench: dict | None, log: Path | None, two_ranks: Path | None,
           feed_data: dict | None, commit: str | None, ceiling: dict | None = None, step: dict | None = None,
           gpu_tests: Path | None = None) -> dict:
    env = environment.report()
    epochs = epochs_after_the_first(log)
    rates = (bench or {}).get("images_per_s", {})
    try:
        images, per_image = shards.load_manifest(shards_dir).splits["train"].samples, \
            jpeg_bytes_per_image(shards_dir)
    except (UserError, OSError):
        images, per_image = None, None
    step_rates = (step or {}).get("images_per_s") or {}
    result = {"commit": commit_of_tree(commit), "gpu": env["GPU"], "torch": env["torch"], "dali": env["nvidia-dali"],
              "images": images, "bytes_per_image": per_image, "step_alone": step_rates.get("+compile"),
              "synthetic": rates.get("synthetic"), "bench_real": rates.get("dali"), "bench_feeds": rates or None,
              "train_logged": epochs.get("images_per_s"), "data_wait": epochs.get("data_wait"),
              "host_wait": epochs.get("host_wait"), "fed_over_synthetic": None,
              "loader_alone": loader["rows"] if loader and loader.get("rows") else None,
              "ceiling": ceiling["rows"] if ceiling and ceiling.get("rows") else None,
              "two_ranks_test": pytest_outcome(two_ranks), "gpu_tests": pytest_outcome(gpu_tests),
              "feed_data": feed_data}
    if result["train_logged"] is not None and result["synthetic"]:
        result["fed_over_synthetic"] = result["train_logged"] / result["synthetic"]
    result["missing"] = [k for k, v in result.items() if v is None or v == "not run"]
    result["limit"] = limit(result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--loader", type=Path, help="alexnet-bench loader --record output (the train rows)")
    p.add_argument("--ceiling", type=Path, help="alexnet-bench loader --record output (decoding alone, CPU side)")
    p.add_argument("--step", type=Path, help="tools/step_profile.py --record output")
    p.add_argument("--gpu-tests", type=Path, help="pytest output of the GPU tests")
    p.add_argument("--bench", type=Path, help="alexnet-bench train --record output")
    p.add_argument("--train-log", type=Path, help="alexnet-train's RUN/log.jsonl")
    p.add_argument("--two-ranks", type=Path, help="pytest output of the two-ranks test")
    p.add_argument("--feed-data", type=Path, help="the feed set's timings (gpu_check.sh feed-data)")
    p.add_argument("--commit", help="the commit measured (default: git's HEAD, if there is git)")
    a = p.parse_args(argv)
    result = record(a.shards, loader=read_json(a.loader), bench=read_json(a.bench), log=a.train_log,
                    two_ranks=a.two_ranks, feed_data=read_json(a.feed_data), commit=a.commit,
                    ceiling=read_json(a.ceiling), step=read_json(a.step), gpu_tests=a.gpu_tests)
    a.out.write_text(json.dumps(result, indent=1) + "\n")

    def rate(v):
        return "-" if v is None else f"{v:,.0f}"
    print(f"{a.out}: synthetic {rate(result['synthetic'])}, bench dali {rate(result['bench_real'])}, alexnet-train "
          f"{rate(result['train_logged'])} images/s, two ranks {result['two_ranks_test']}; missing: "
          f"{', '.join(result['missing']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
