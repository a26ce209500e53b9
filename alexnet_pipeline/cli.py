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
    p.add_argument("--layout", choices=("auto", "folders", "archives"), default="auto",
                   help="which layout to read when both are present (default auto: folders first)")
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

    from . import imagenet, prep

    cfg = prep.PrepConfig(a.imagenet_root, a.out, a.splits, a.workers, a.shard_size, a.quality, seed=a.seed,
                          limit_per_class=a.limit_per_class, layout=a.layout, progress=a.progress)
    try:
        report = prep.run(cfg)
    except (imagenet.LayoutError, prep.PrepError) as e:
        print(f"alexnet-prep: error: {e}", file=sys.stderr)
        return 2
    _print_prep_summary(cfg, report)
    return 0


def _print_prep_summary(cfg, report) -> None:
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
    if (path / shards.STATS).exists():
        with np.load(path / shards.STATS) as z:
            np.set_printoptions(precision=3, suppress=True)
            print(f"  mean_rgb {z['mean_rgb']}  std_rgb {z['std_rgb']}  (0-255, {int(z['n_pixels'])} pixels)")
            print(f"  PCA eigval {z['eigval']}  eigvec columns\n{z['eigvec']}")
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fail(prog: str, e: Exception) -> int:
    """A bad directory, checkpoint or option: one line naming it, status 2, no traceback."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def train_main(argv=None) -> int:
    """alexnet-train: the paper's AlexNet and recipe on prepared shards (one process, or many with torchrun)."""
    from .train import TrainConfig

    d = TrainConfig(Path("."), Path("."))
    p = argparse.ArgumentParser(prog="alexnet-train", description=train_main.__doc__.split(": ", 1)[1],
                                epilog="Two GPUs: torchrun --nproc-per-node 2 $(which alexnet-train) --shards ...")
    p.add_argument("--shards", type=Path, required=True, help="directory written by alexnet-prep")
    p.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, logs, plot")
    p.add_argument("--epochs", type=_positive, default=d.epochs, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="global, over all ranks (default 128)")
    p.add_argument("--lr", type=_positive_float, help="default 0.01 x batch-size / 128 (linear scaling)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=("plateau", "step"), default=d.schedule,
                   help="plateau: /10 when val error stops improving (the paper, default); step: every --step-epochs")
    p.add_argument("--patience", type=_positive, default=d.patience, help="plateau: epochs without improvement")
    p.add_argument("--step-epochs", type=_positive, default=d.step_epochs)
    p.add_argument("--max-drops", type=int, default=d.max_drops, help="lr divisions by 10 at most (default 3)")
    p.add_argument("--variant", choices=("paper", "torchvision"), default=d.variant)
    p.add_argument("--width", type=_positive_float, default=d.width, help="channel multiplier (quick CPU runs)")
    p.add_argument("--model-parallel", action="store_true", help="the two columns on two GPUs, as in the paper")
    p.add_argument("--device", default=d.device, help="auto (default: this rank's GPU, else CPU), cpu, cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--mean", choices=("channel", "pixel"), default=d.mean)
    p.add_argument("--lighting-sigma", type=float, default=d.lighting_sigma, help="PCA lighting; 0 turns it off")
    p.add_argument("--lighting-form", choices=("sqrt", "eigval"), default=d.lighting_form)
    p.add_argument("--threads", type=_positive, help="DALI threads per rank (default: every core)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=_positive, default=d.log_every, help="steps per log line (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-tencrop", dest="tencrop", action="store_false", help="skip the final ten-crop validation")
    a = vars(p.parse_args(argv))
    if a["max_drops"] < 0:
        p.error("--max-drops must be 0 or more")
    from .pipeline import ShardError
    from .train import Diverged, run

    try:
        cfg = TrainConfig(**a)
        result = run(cfg)
    except (ShardError, ValueError, FileNotFoundError) as e:
        return _fail("alexnet-train", e)
    except Diverged as e:
        print(f"alexnet-train: {e}", file=sys.stderr)
        return 1
    return 128 + result["stopped"] if result.get("stopped") else 0


def eval_main(argv=None) -> int:
    """alexnet-eval: top-1/top-5 error of a checkpoint with center crops and (--tencrop) the paper's ten crops."""
    p = argparse.ArgumentParser(prog="alexnet-eval", description=eval_main.__doc__.split(": ", 1)[1])
    p.add_argument("--shards", type=Path, required=True, help="directory written by alexnet-prep (uses val)")
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoint.pt or RUN/best.pt")
    p.add_argument("--tencrop", action="store_true", help="also ten crops: 4 corners + center, and mirrors")
    p.add_argument("--batch-size", type=_positive, default=128, help="images per rank (default 128)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=_positive, help="DALI threads per rank (default: every core)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    if not a.checkpoint.is_file():
        return _fail("alexnet-eval", f"{a.checkpoint}: no such checkpoint")
    import json

    from . import evaluate
    from .pipeline import ShardError

    try:
        result = evaluate.run(evaluate.EvalConfig(a.shards, a.checkpoint, a.tencrop, a.batch_size, a.device,
                                                  a.threads))
    except (ShardError, ValueError, KeyError, RuntimeError) as e:
        return _fail("alexnet-eval", e)
    if not result:  # not rank 0
        return 0
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{a.checkpoint} (epoch {result['epoch']}) on {result['ranks']} x {result['device']}")
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
    p = argparse.ArgumentParser(prog="alexnet-bench", description=bench_main.__doc__.split(": ", 1)[1])
    sub = p.add_subparsers(dest="stage", required=True)
    bp = sub.add_parser("prep", help="alexnet-prep (1 and all workers) vs a naive one-process Pillow loop")
    bp.add_argument("--imagenet-root", type=Path, default=Path("data/sample/extracted"))
    bp.add_argument("--repeats", type=_positive, default=3)
    bp.add_argument("--workers", type=_positive, default=None, help="the 'all workers' count (default: cores)")
    bp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pp = sub.add_parser("pipeline", help="DALI loaders vs a DataLoader + Pillow-SIMD baseline vs decode only")
    pp.add_argument("--shards", type=Path, default=Path("data/shards"))
    pp.add_argument("--batch-size", type=_positive, default=64)
    pp.add_argument("--threads", type=_positive, default=None, help="DALI threads = baseline workers (default: cores)")
    pp.add_argument("--repeats", type=_positive, default=5)
    pp.add_argument("--epochs", type=_positive, default=2, help="epochs per timed repeat")
    pp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pp.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    pp.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the (slow) baseline")
    pp.add_argument("--json", action="store_true")
    tp = sub.add_parser("train", help="training step fed by the DALI pipeline vs by a batch held on the device")
    tp.add_argument("--shards", type=Path, default=Path("data/shards"))
    tp.add_argument("--batch-size", type=_positive, default=128)
    tp.add_argument("--steps", type=_positive, default=20, help="steps per timed repeat")
    tp.add_argument("--repeats", type=_positive, default=5)
    tp.add_argument("--device", default="auto", help="auto (default: the GPU if there is one), cpu, cuda")
    tp.add_argument("--threads", type=_positive, default=None, help="DALI threads (default: cores)")
    tp.add_argument("--width", type=_positive_float, default=1.0)
    tp.add_argument("--variant", choices=("paper", "torchvision"), default="paper")
    tp.add_argument("--compile", action="store_true")
    tp.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from . import bench
    from .pipeline import ShardError

    try:
        if a.stage == "pipeline":
            return bench.pipeline_main(a.shards, a.batch_size, a.threads, a.repeats, a.epochs, a.device, a.dtype,
                                       a.baseline, a.json)
        if a.stage == "train":
            return bench.train_main(a.shards, a.batch_size, a.steps, a.repeats, a.device, a.threads, a.width,
                                    a.variant, a.compile, a.json)
    except (ShardError, ValueError) as e:  # a bad directory or option: say which, no traceback
        return _fail("alexnet-bench", e)
    return bench.prep_main(a.imagenet_root, a.repeats, a.workers, a.json)
