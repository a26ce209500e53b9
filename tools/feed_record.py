#!/usr/bin/env python3
"""The machine-written record of a feed measurement (tools/gpu_check.sh stage `feed`):

    python tools/feed_record.py --shards SHARDS --loader loader.json --bench bench.json --train-log log.jsonl \
        --two-ranks two_ranks.txt --out h200_feed.json

reads what the stage's commands wrote (alexnet-bench loader --json, alexnet-bench train --json, alexnet-train's
RUN/log.jsonl, the pytest output of the two-ranks test) and writes one JSON object:

    commit, gpu, torch, dali            what ran
    images, bytes_per_image             the train split measured, JPEG bytes per image
    synthetic, bench_real               alexnet-bench train: the step alone, and fed by the default DALI loader
    train_logged, data_wait             alexnet-train: medians of its logged images/s and data wait after epoch 1
    loader_alone                        alexnet-bench loader's rows
    two_ranks_test                      "passed" or "failed"

The README's GPU tables are made from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet_pipeline import shards  # noqa: E402


def jpeg_bytes_per_image(shards_dir: Path) -> float:
    """Mean size of the train split's JPEG members (the images themselves, not the tar headers)."""
    sizes = []
    for path in shards.shard_paths(shards_dir, "train"):
        with tarfile.open(path) as tf:
            sizes += [m.size for m in tf if m.name.endswith(".jpg")]
    return statistics.mean(sizes)


def logged_after_first_epoch(log: Path) -> tuple[float, float]:
    """Medians of alexnet-train's logged images/s and data wait over the intervals after its first epoch."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    later = [r for r in rows if r.get("kind") == "train" and r["epoch"] > 1]
    if not later:
        raise SystemExit(f"{log}: no logged interval after the first epoch (train at least 2 epochs)")
    return statistics.median(r["images_per_s"] for r in later), statistics.median(r["data_wait"] for r in later)


def record(shards_dir: Path, loader: dict, bench: dict, log: Path, two_ranks: str) -> dict:
    env = bench["environment"]
    rate, wait = logged_after_first_epoch(log)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {"commit": commit.strip() or "unknown", "gpu": env["GPU"], "torch": env["torch"],
            "dali": env["nvidia-dali"], "images": shards.load_manifest(shards_dir)["splits"]["train"]["samples"],
            "bytes_per_image": jpeg_bytes_per_image(shards_dir), "synthetic": bench["images_per_s"]["synthetic"],
            "bench_real": bench["images_per_s"]["dali"], "bench_feeds": bench["images_per_s"],
            "train_logged": rate, "data_wait": wait, "loader_alone": loader["rows"],
            "two_ranks_test": "passed" if " passed" in two_ranks and "failed" not in two_ranks else "failed"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--loader", type=Path, required=True, help="alexnet-bench loader --json output")
    p.add_argument("--bench", type=Path, required=True, help="alexnet-bench train --json output")
    p.add_argument("--train-log", type=Path, required=True, help="alexnet-train's RUN/log.jsonl")
    p.add_argument("--two-ranks", type=Path, required=True, help="pytest output of the two-ranks test")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    result = record(a.shards, json.loads(a.loader.read_text()), json.loads(a.bench.read_text()), a.train_log,
                    a.two_ranks.read_text())
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{a.out}: synthetic {result['synthetic']:,.0f}, bench dali {result['bench_real']:,.0f} "
          f"({result['bench_real'] / result['synthetic']:.2f}x), alexnet-train {result['train_logged']:,.0f} images/s "
          f"(data wait {result['data_wait']:.0%}), two ranks {result['two_ranks_test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
