"""Command-line parsing only: each command builds its typed config and calls its module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _splits(text: str) -> tuple[str, ...]:
    parts = tuple(s.strip() for s in text.split(",") if s.strip())
    if not parts or any(p not in ("train", "val") for p in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"expected train, val or train,val; got {text!r}")
    return parts


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be 1..100, got {value}")
    return value


def _print_table(rows: dict) -> None:
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")


def prep_main(argv=None) -> int:
    """alexnet-prep: ImageNet -> shuffled WebDataset shards with index files and statistics."""
    p = argparse.ArgumentParser(prog="alexnet-prep", description=prep_main.__doc__.split(": ", 1)[1])
    p.add_argument("--imagenet-root", type=Path, help="ImageNet as folders and/or the official tar archives")
    p.add_argument("--out", type=Path, help="output directory for shards, dataset.json and stats.npz")
    p.add_argument("--verify", type=Path, metavar="SHARDS", help="re-read a prepared directory and check it")
    p.add_argument("--version", action="store_true", help="print versions, PIL flavour and GPUs, then exit")
    p.add_argument("--splits", type=_splits, default=("train", "val"), help="train,val (default) or one")
    p.add_argument("--workers", type=int, default=0, help="processes (default 0: every available core)")
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality (default 95, as cuda-convnet2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global train shuffle (default 0)")
    p.add_argument("--limit-per-class", type=_positive, help="keep the first N files of each class")
    p.add_argument("--layout", choices=("auto", "folders", "archives", "hf"), default="auto",
                   help="which layout to read when several are present (default auto: folders, then the official "
                        "archives, then Hugging Face's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    a = p.parse_args(argv)
    if a.version:
        from .environment import report

        _print_table(report())
        return 0
    if a.verify:
        return _verify(a.verify)
    if a.imagenet_root is None or a.out is None:
        p.error("--imagenet-root and --out are required (or --verify SHARDS, or --version)")
    if a.workers < 0:
        p.error("--workers must be 0 (all cores) or more")

    from . import prep
    from .config import UserError

    cfg = prep.PrepConfig(a.imagenet_root, a.out, a.splits, a.workers, a.shard_size, a.quality, seed=a.seed,
                          limit_per_class=a.limit_per_class, layout=a.layout, progress=a.progress)
    try:
        report = prep.run(cfg)
    except UserError as e:
        return _fail("alexnet-prep", e)
    except prep.Interrupted as e:  # one line; the workers are gone; the same command resumes
        print(f"alexnet-prep: {e}", file=sys.stderr)
        return 128 + e.signum
    _print_prep_summary(cfg, report)
    return 0


def _print_prep_summary(cfg, report) -> None:
    for note in report.notes:
        print(f"note: {note}")
    if report.resumed and not report.processed:
        print(f"{cfg.out}: already complete with these options; nothing to do")
    done = ", ".join(f"{n} {s}" for s, n in report.samples.items())
    rate = f", {report.processed / report.seconds:.0f} images/s" if report.processed else ""
    print(f"wrote {done} samples to {cfg.out} in {report.seconds:.1f} s{rate}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} files (listed in {cfg.out}/dataset.json):")
        for s in report.skipped[:20]:
            print(f"  {s['source']}: {s['reason']}")
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more")


def _verify(path: Path) -> int:
    import numpy as np

    from . import shards

    problems = shards.verify(path)
    if problems:
        print(f"alexnet-prep: verify failed: {problems[0]}", file=sys.stderr)
        for more in problems[1:10]:
            print(f"  also: {more}", file=sys.stderr)
        return 1
    m = shards.load_manifest(path)
    print(f"{path}: OK, {len(m['classes'])} classes, " +
          ", ".join(f"{s} {e['samples']} samples in {len(e['shards'])} shards" for s, e in m["splits"].items()))
    if "train" in m["splits"]:
        z = shards.load_stats(path)
        np.set_printoptions(precision=3, suppress=True)
        print(f"  mean_rgb {z['mean_rgb']}  std_rgb {z['std_rgb']}  (0-255, {int(z['n_pixels'])} pixels)")
        print(f"  PCA eigval {z['eigval']}  eigvec columns\n{z['eigvec']}")
    return 0


def _fail(prog: str, e: Exception) -> int:
    """A problem the user can fix (config.UserError): one line naming it, status 2, no traceback."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def _parser(main, **kwargs) -> argparse.ArgumentParser:
    prog, description = main.__doc__.split(": ", 1)
    return argparse.ArgumentParser(prog=prog, description=description, **kwargs)


def train_main(argv=None) -> int:
    """alexnet-train: the paper's AlexNet and recipe on prepared shards (one process, or many with torchrun)."""
    from .config import UserError, add_arguments, from_arguments
    from .train import Diverged, TrainConfig, run

    p = _parser(train_main, usage="%(prog)s --shards SHARDS --out RUN [options]",
                epilog="Two GPUs: torchrun --nproc-per-node 2 $(which alexnet-train) --shards ...")
    add_arguments(p, TrainConfig)
    a = p.parse_args(argv)
    try:
        result = run(from_arguments(TrainConfig, a))
    except UserError as e:
        return _fail("alexnet-train", e)
    except Diverged as e:
        print(f"alexnet-train: {e}", file=sys.stderr)
        return 1
    return 128 + result["stopped"] if result.get("stopped") else 0


def eval_main(argv=None) -> int:
    """alexnet-eval: top-1/top-5 error of a checkpoint with center crops and (--tencrop) the paper's ten crops."""
    import json

    from . import evaluate
    from .config import UserError, add_arguments, from_arguments

    p = _parser(eval_main, usage="%(prog)s --shards SHARDS --checkpoint RUN/checkpoint.pt [options]")
    add_arguments(p, evaluate.EvalConfig)
    a = p.parse_args(argv)
    try:
        cfg = from_arguments(evaluate.EvalConfig, a)
        result = evaluate.run(cfg)
    except UserError as e:
        return _fail("alexnet-eval", e)
    if not result:  # not rank 0
        return 0
    if cfg.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{cfg.checkpoint} (epoch {result['epoch']}) on {result['ranks']} x {result['device']}, "
          f"{result['mean']} mean, {result['precision']}")
    print(f"{'':<10}{'images':>8}{'top-1 err':>11}{'top-5 err':>11}")
    for name in ("center", "tencrop"):
        if name in result:
            r = result[name]
            print(f"{name:<10}{r['images']:>8}{r['top1_error']:>11.2%}{r['top5_error']:>11.2%}")
    c = result["classes"]
    print(f"{'chance':<10}{'':>8}{1 - 1 / c:>11.2%}{max(0, 1 - 5 / c):>11.2%}   ({c} classes)")
    return 0


def bench_main(argv=None) -> int:
    """alexnet-bench: throughput of each stage against the baseline a user would otherwise pick, as ratios."""
    from . import bench
    from .config import UserError, add_arguments, from_arguments

    p = _parser(bench_main)
    sub = p.add_subparsers(dest="stage", required=True)
    for name, cls, help in (("prep", bench.PrepBench, "alexnet-prep (1 and all workers) vs a naive Pillow loop"),
                            ("pipeline", bench.PipelineBench, "DALI loaders vs a DataLoader + Pillow-SIMD baseline "
                                                              "vs decode only"),
                            ("train", bench.TrainBench, "the training step fed by a batch held on the device, by "
                                                        "the DALI pipeline and by the DataLoader baseline")):
        add_arguments(sub.add_parser(name, help=help, description=cls.__doc__), cls)
    a = p.parse_args(argv)
    cls = {"prep": bench.PrepBench, "pipeline": bench.PipelineBench, "train": bench.TrainBench}[a.stage]
    try:
        return bench.main(from_arguments(cls, a))
    except UserError as e:
        return _fail("alexnet-bench", e)
