"""The samples handed to DALI with and without a copy (`no_copy` of the samples' external source), in one
process, alternating: the reader alone (bytes and labels into DALI, as `alexnet-bench storage`'s reader rows)
and the whole CPU train graph (whole epochs, as its `local` row). Medians of 3 rounds after a warm-up.

    python tools/no_copy_ab.py --shards SHARDS [--batch-size 64 --streams 4 --shuffle-window 1]
"""

import argparse
import json
import statistics
from pathlib import Path

import nvidia.dali.fn as fn

from alexnet_pipeline.bench import _epoch_rate, _pipe_rate
from alexnet_pipeline.options import LoaderConfig
from alexnet_pipeline.pipeline import Loader

_real, _no_copy = fn.external_source, [False]


def _source(source, **kw):  # the samples' source (two outputs) built with the flag under test
    if kw.get("num_outputs") == 2 and "no_copy" in kw:
        kw["no_copy"] = _no_copy[0]
    return _real(source, **kw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--shuffle-window", type=int, default=1)
    a = p.parse_args()
    fn.external_source = _source  # type: ignore[assignment]
    cfg = LoaderConfig(shards=a.shards, split="train", device="cpu", batch_size=a.batch_size, streams=a.streams,
                       shuffle_window=a.shuffle_window)
    pipes = {}
    for flag in (False, True):
        _no_copy[0] = flag
        loader = Loader(cfg, True, digest=False)
        pipes[flag] = (loader.graph(upto="samples"), loader.runs)
    rows: dict[str, list[float]] = {f"{what}_{flag}": [] for what in ("alone", "graph") for flag in (False, True)}
    for round_ in range(4):  # round 0: the warm-up
        for flag in ((False, True) if round_ % 2 == 0 else (True, False)):
            _no_copy[0] = flag
            pipe, runs = pipes[flag]
            alone = _pipe_rate(pipe, runs, loader.cfg.run_size)  # the loaders' runs are alike
            graph = _epoch_rate(lambda: Loader(cfg, True, digest=False), 1, skip=1)
            if round_:
                rows[f"alone_{flag}"].append(alone)
                rows[f"graph_{flag}"].append(graph)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(json.dumps({"medians": med, "rounds": rows,
                      "reader_alone_no_copy_over_copy": med["alone_True"] / med["alone_False"],
                      "whole_graph_no_copy_over_copy": med["graph_True"] / med["graph_False"]}, indent=1))


if __name__ == "__main__":
    main()
