"""The CPU train loader's images/s by the images in a DALI run, with this package's sample reader and with
DALI's own webdataset reader (as `alexnet-bench storage`'s `local` and `dali_reader` rows), in one process:
whole epochs after an untimed one, the two readers in turn (their order flipped every round), medians of
--rounds rounds after a warm-up, and the paired ratio ours / DALI's per round.

    python tools/run_size_ab.py --shards SHARDS [--batch-size 64 --per-run 1,2,4 --streams 4 --shuffle-window 1]
"""

import argparse
import dataclasses
import functools
import json
import statistics
from pathlib import Path

from alexnet_pipeline.bench import _epoch_rate, _reference
from alexnet_pipeline.options import LoaderConfig
from alexnet_pipeline.pipeline import Loader
from alexnet_pipeline.shards import shard_paths


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-run", default="1,2,4", help="batches a DALI run, comma-separated")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--shuffle-window", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    base = LoaderConfig(shards=a.shards, split="train", device="cpu", batch_size=a.batch_size, streams=a.streams,
                        shuffle_window=a.shuffle_window)
    paths = shard_paths(a.shards, "train")
    result = {}
    for k in (int(x) for x in a.per_run.split(",")):
        cfg = dataclasses.replace(base, batches_per_run=k)
        makes = {"ours": functools.partial(Loader, cfg, True, digest=False),
                 "dali": functools.partial(_reference, cfg, paths)}
        rates: dict[str, list[float]] = {"ours": [], "dali": []}
        for round_ in range(a.rounds + 1):  # round 0: the warm-up
            for name in (("ours", "dali") if round_ % 2 else ("dali", "ours")):
                rate = _epoch_rate(makes[name], 1, skip=1)
                if round_:
                    rates[name].append(rate)
        paired = [o / d for o, d in zip(rates["ours"], rates["dali"], strict=True)]
        result[f"{a.batch_size}x{k}"] = {"images_per_s": {n: statistics.median(v) for n, v in rates.items()},
                                         "ours_over_dali_paired": statistics.median(paired), "rounds": rates}
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
