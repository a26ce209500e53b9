"""python -m alexnet_pipeline prep|train|eval|bench|predict|export ...: the commands without their installed
scripts, e.g. `torchrun --nproc-per-node 2 -m alexnet_pipeline train --shards SHARDS --out RUN`."""

import sys

from . import cli

COMMANDS = {"prep": cli.prep_main, "train": cli.train_main, "eval": cli.eval_main, "bench": cli.bench_main,
            "predict": cli.predict_main, "export": cli.export_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m alexnet_pipeline {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
