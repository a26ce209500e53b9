#!/usr/bin/env python3
"""The machine-written record of a feed measurement (tools/gpu_check.sh, the third call of the feed round):

    python tools/feed_record.py --shards SHARDS --out h200_feed.json [--loader loader.json] [--bench bench.json]
        [--train-log log.jsonl] [--two-ranks two_ranks.txt] [--feed-data feed_data.json] [--commit SHA]

reads whatever the round's commands have written so far (alexnet-bench loader/train --record files,
alexnet-train's RUN/log.jsonl, the pytest output of the two-ranks test, the feed set's timings) and writes one
JSON object. gpu_check.sh writes it again after every command, so a round cut short still leaves a record of
what it measured; an input that is missing, empty or cut off leaves its keys null and named under `missing`:

    commit, gpu, torch, dali            what ran (gpu, torch and dali read on the machine that writes this)
    images, bytes_per_image             the train split measured, JPEG bytes per image
    synthetic, bench_real               alexnet-bench train: the step alone, and fed by the default DALI loader
    train_logged, data_wait             alexnet-train: medians of its logged images/s and data wait after epoch 1
    loader_alone                        alexnet-bench loader's rows
    two_ranks_test                      passed, failed, skipped or not run
    feed_data                           the feed set's sample-maker and prep seconds (first call)

The README's GPU tables are made from it.
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


def logged_after_first_epoch(log: Path | None) -> tuple[float | None, float | None]:
    """Medians of alexnet-train's logged images/s and data wait over the intervals after its first epoch."""
    if log is None or not log.exists():
        return None, None
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a time-out ends what can be read
    later = [r for r in rows if r.get("kind") == "train" and r["epoch"] > 1]
    if not later:
        return None, None
    return statistics.median(r["images_per_s"] for r in later), statistics.median(r["data_wait"] for r in later)


def two_ranks_outcome(path: Path | None) -> str:
    """pytest's summary line of the two-ranks test: passed, failed, skipped, or not run."""
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
           feed_data: dict | None, commit: str | None) -> dict:
    env = environment.report()
    rate, wait = logged_after_first_epoch(log)
    rates = (bench or {}).get("images_per_s", {})
    try:
        images, per_image = shards.load_manifest(shards_dir).splits["train"].samples, \
            jpeg_bytes_per_image(shards_dir)
    except (UserError, OSError):
        images, per_image = None, None
    result = {"commit": commit_of_tree(commit), "gpu": env["GPU"], "torch": env["torch"], "dali": env["nvidia-dali"],
              "images": images, "bytes_per_image": per_image, "synthetic": rates.get("synthetic"),
              "bench_real": rates.get("dali"), "bench_feeds": rates or None, "train_logged": rate, "data_wait": wait,
              "loader_alone": loader["rows"] if loader and loader.get("rows") else None,
              "two_ranks_test": two_ranks_outcome(two_ranks), "feed_data": feed_data}
    result["missing"] = [k for k, v in result.items() if v is None or v == "not run"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--loader", type=Path, help="alexnet-bench loader --record output")
    p.add_argument("--bench", type=Path, help="alexnet-bench train --record output")
    p.add_argument("--train-log", type=Path, help="alexnet-train's RUN/log.jsonl")
    p.add_argument("--two-ranks", type=Path, help="pytest output of the two-ranks test")
    p.add_argument("--feed-data", type=Path, help="the feed set's timings (gpu_check.sh feed-data)")
    p.add_argument("--commit", help="the commit measured (default: git's HEAD, if there is git)")
    a = p.parse_args(argv)
    result = record(a.shards, loader=read_json(a.loader), bench=read_json(a.bench), log=a.train_log,
                    two_ranks=a.two_ranks, feed_data=read_json(a.feed_data), commit=a.commit)
    a.out.write_text(json.dumps(result, indent=1) + "\n")

    def rate(v):
        return "-" if v is None else f"{v:,.0f}"
    print(f"{a.out}: synthetic {rate(result['synthetic'])}, bench dali {rate(result['bench_real'])}, alexnet-train "
          f"{rate(result['train_logged'])} images/s, two ranks {result['two_ranks_test']}; missing: "
          f"{', '.join(result['missing']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
