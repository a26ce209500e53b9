#!/usr/bin/env python3
"""What the loader's background digest of its shards costs: the first epoch of a train loader (CPU, batch 128)
with the digest and with it turned off, in the same process, alternating, median of 3 after a warm-up of each.

    python tools/digest_bench.py SHARDS
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet_pipeline import pipeline  # noqa: E402


def first_epoch(shards: str, digest: bool) -> float:
    """images/s of a new loader's first epoch (the digest runs once per loader)."""
    real = pipeline._Digest._run
    if not digest:
        # the thread starts and ends at once; setattr, as mypy refuses an assignment to a method
        setattr(pipeline._Digest, "_run", lambda self, mine: None)  # noqa: B010  # see the line above
    try:
        loader = pipeline.train_loader(shards, batch_size=128, device="cpu")
        t0, n = time.perf_counter(), 0
        for images, _ in loader:
            n += images.shape[0]
        return n / (time.perf_counter() - t0)
    finally:
        setattr(pipeline._Digest, "_run", real)  # noqa: B010  # mypy refuses an assignment to a method


def main(argv: list[str]) -> int:
    shards = argv[0]
    first_epoch(shards, True)
    first_epoch(shards, False)
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for digest in (True, False):
            rates[digest].append(first_epoch(shards, digest))
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"first epoch of a train loader ({shards}): {on:,.0f} images/s with the digest, {off:,.0f} without "
          f"({on / off:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
