"""Command-line parsing only: each command builds its typed config and calls its module, through one skeleton
(`_command`): file names that are not valid UTF-8 print as escapes, the parser is made from the config's
declarations, and a problem the user can fix (config.UserError) is one line and exit status 2, a store gone for good
(storage.StoreGone) one line and exit status 1. Heavy modules
are imported inside the commands that need them: `alexnet-prep` imports neither torch nor DALI."""

from __future__ import annotations

import argparse
import sys


def _printable_output() -> None:
    """File names that are not valid UTF-8 print as escapes instead of stopping a command with a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _print_table(rows: dict) -> None:
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")


def _command(main, argv, act, *, config=None, arguments=lambda p: None, require: bool = True, **parser) -> int:
    """The skeleton of every command: a parser named by `main`'s docstring with the flags of `config`'s
    declarations (`require`: its options without a default are required) and what `arguments` adds, then
    act(parsed arguments, parser); a UserError is one line and status 2."""
    from .config import UserError, add_arguments
    from .storage import StoreGone

    _printable_output()
    prog, description = main.__doc__.split(": ", 1)
    p = argparse.ArgumentParser(prog=prog, description=description, **parser)
    arguments(p)
    if config is not None:
        add_arguments(p, config, require=require)
    a = p.parse_args(argv)
    try:
        return act(a, p)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except StoreGone as e:  # the store went away for good: not the input's fault; the last checkpoint stands
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def prep_main(argv=None) -> int:
    """alexnet-prep: ImageNet -> shuffled WebDataset shards with index files and statistics."""
    from .config import from_arguments
    from .prep import Interrupted, OutOfFiles, PrepConfig, WorkerDied, run
    from .storage import StoreGone

    def arguments(p):
        p.add_argument("--verify", metavar="SHARDS", help="re-read a prepared directory (or its URL in a store) and "
                       "check it (with --workers processes)")
        p.add_argument("--version", action="store_true", help="print versions, PIL flavour and GPUs, then exit")

    def act(a, p) -> int:
        if a.version:
            from .environment import report as versions

            _print_table(versions())
            return 0
        if a.verify:
            return _verify(a.verify, a.workers, a.progress, a.progress_every, a.storage_timeout)
        if a.imagenet_root is None or a.out is None:
            p.error("--imagenet-root and --out are required (or --verify SHARDS, or --version)")
        cfg = from_arguments(PrepConfig, a)
        try:
            report = run(cfg)
        except Interrupted as e:  # one line; the workers are gone; the same command resumes
            print(f"alexnet-prep: {e}", file=sys.stderr)
            return 128 + e.signum
        except (WorkerDied, OutOfFiles, StoreGone) as e:  # not the input's fault (memory, a crash, a limit, a
            # store gone): 1, resumable
            print(f"alexnet-prep: {e}", file=sys.stderr)
            return 1
        _print_prep_summary(cfg, report)
        return 0

    return _command(prep_main, argv, act, config=PrepConfig, arguments=arguments, require=False,  # or --verify
                    usage="%(prog)s --imagenet-root ROOT --out SHARDS [options] | --verify SHARDS | --version")


def _print_prep_summary(cfg, report) -> None:
    for note in report.notes:
        print(f"note: {note}")
    for stage in report.stages:
        print(stage.line())
    if report.resumed and not report.processed:
        print(f"{cfg.local_out}: already complete with these options and this source; nothing to do")
    done = ", ".join(f"{n} {s}" for s, n in report.samples.items())
    rate = f", {report.processed / report.seconds:.0f} images/s" if report.processed else ""
    print(f"wrote {done} samples to {cfg.local_out} in {report.seconds:.1f} s{rate}")
    if report.published:
        from .storage import human

        p = report.published
        print(f"published to {p.url}: {p.uploaded} files uploaded ({human(p.bytes)}), {p.kept} already there")
    if report.skipped:
        print(f"skipped {len(report.skipped)} files (listed in {cfg.local_out}/dataset.json):")
        for s in report.skipped[:20]:
            print(f"  {s['source']}: {s['reason']}")
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more")


def _verify(where: str, workers: int, progress: bool | None, every: float, timeout: float) -> int:
    import os

    import numpy as np

    from . import files, shards, storage, verified
    from .prep.workers import WorkerDied, pool
    from .progress import Progress, mode

    path = storage.location(where)
    storage.configure(timeout)
    files.raise_open_file_limit()
    try:
        n = sum(len(e.shards) for e in shards.load_manifest(path).splits.values())
    except shards.ShardError:
        n = 0  # verify names the problem
    bar = Progress("verify", n, "shards", mode(progress), every)
    try:
        with pool(min(workers or len(os.sched_getaffinity(0)), max(1, n))) as processes:
            problems = shards.verify(path, pool=processes, progress=bar)
    except (WorkerDied, storage.StoreGone) as e:  # as for prep: not the data's fault, one line, status 1
        print(f"alexnet-prep: verify: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alexnet-prep: verify interrupted by SIGINT", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in files.OPEN_FILE_ERRNOS:
            raise
        print(f"alexnet-prep: verify: {files.open_files_error(e)}", file=sys.stderr)
        return 1
    print(bar.close().line())
    if problems:
        print(f"alexnet-prep: verify failed: {problems[0]}", file=sys.stderr)
        for more in problems[1:10]:
            print(f"  also: {more}", file=sys.stderr)
        return 1
    if not isinstance(path, str):  # a local directory (a URL stays text)
        verified.remember_verified(path)  # loader starts now trust these bytes at these sizes and times
    m = shards.load_manifest(path)
    print(f"{path}: OK, {len(m.classes)} classes, " +
          ", ".join(f"{s} {e.samples} samples in {len(e.shards)} shards" for s, e in m.splits.items()))
    if "train" in m.splits:
        z = shards.load_stats(path)
        np.set_printoptions(precision=3, suppress=True)
        print(f"  mean_rgb {z['mean_rgb']}  std_rgb {z['std_rgb']}  (0-255, {int(z['n_pixels'])} pixels)")
        print(f"  PCA eigval {z['eigval']}  eigvec columns\n{z['eigvec']}")
    return 0


def train_main(argv=None) -> int:
    """alexnet-train: the paper's AlexNet and recipe on prepared shards (one process, or many with torchrun)."""
    from .config import from_arguments
    from .train import Diverged, TrainConfig, run

    def act(a, p) -> int:
        try:
            result = run(from_arguments(TrainConfig, a))
        except Diverged as e:
            print(f"alexnet-train: {e}", file=sys.stderr)
            return 1
        return 128 + result["stopped"] if result.get("stopped") else 0

    return _command(train_main, argv, act, config=TrainConfig, usage="%(prog)s --shards SHARDS --out RUN [options]",
                    epilog="Two GPUs: torchrun --nproc-per-node 2 $(which alexnet-train) --shards ...")


def eval_main(argv=None) -> int:
    """alexnet-eval: top-1/top-5 error of a checkpoint with center crops and (--tencrop) the paper's ten crops."""
    from . import evaluate
    from .config import from_arguments

    def act(a, p) -> int:
        cfg = from_arguments(evaluate.EvalConfig, a)
        result = evaluate.run(cfg)
        if result:  # rank 0 only
            _print_eval(cfg, result)
        return 0

    return _command(eval_main, argv, act, config=evaluate.EvalConfig,
                    usage="%(prog)s --shards SHARDS --checkpoint RUN/checkpoint.pt [options]")


def _print_eval(cfg, result: dict) -> None:
    import json

    if cfg.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{cfg.checkpoint} (epoch {result['epoch']}) on {result['ranks']} x {result['device']}, "
          f"{result['mean']} mean, {result['precision']}")
    print(f"{'':<10}{'images':>8}{'top-1 err':>11}{'top-5 err':>11}")
    for name in ("center", "tencrop"):
        if name in result:
            r = result[name]
            print(f"{name:<10}{r['images']:>8}{r['top1_error']:>11.2%}{r['top5_error']:>11.2%}")
    c = result["classes"]
    print(f"{'chance':<10}{'':>8}{1 - 1 / c:>11.2%}{max(0, 1 - 5 / c):>11.2%}   ({c} classes)")
    if "figures" in result:
        f = result["figures"]
        print(f"figures: {f['filters']}, {f['predictions']}, {f['neighbours']} (neighbours among "
              f"{f['neighbour_pool']} training images)")


def predict_main(argv=None) -> int:
    """alexnet-predict: the top classes of image files, with names and probabilities, from a trained network."""
    from . import inference
    from .config import from_arguments

    return _command(predict_main, argv, lambda a, p: inference.run(from_arguments(inference.PredictConfig, a)),
                    config=inference.PredictConfig,
                    arguments=lambda p: p.add_argument("images", nargs="+", metavar="IMAGE",
                                                       help="image files (any format PIL reads)"),
                    usage="%(prog)s IMAGE... --checkpoint RUN/best.pt [--tencrop] [--top 5] [--json]")


def export_main(argv=None) -> int:
    """alexnet-export: a trained network as ONNX, or as a torchvision state_dict where the layouts agree."""
    from . import export
    from .config import from_arguments

    def act(a, p) -> int:
        path = export.run(from_arguments(export.ExportConfig, a))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0

    return _command(export_main, argv, act, config=export.ExportConfig,
                    usage="%(prog)s --checkpoint RUN/best.pt --out model.onnx|model.pt [--input uint8]",
                    epilog=export.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)


def bench_main(argv=None) -> int:
    """alexnet-bench: throughput of each stage against the baseline a user would otherwise pick, as ratios."""
    from . import bench
    from .config import add_arguments, from_arguments

    stages = {"prep": bench.PrepBench, "pipeline": bench.PipelineBench, "loader": bench.LoaderBench,
              "train": bench.TrainBench, "storage": bench.StorageBench}

    def arguments(p):
        sub = p.add_subparsers(dest="stage", required=True)
        for name, cls in stages.items():
            doc = cls.__doc__ or name
            add_arguments(sub.add_parser(name, help=doc.split(":")[0].split(".")[0], description=doc), cls)

    return _command(bench_main, argv, lambda a, p: bench.main(from_arguments(stages[a.stage], a)),
                    arguments=arguments)
