#!/usr/bin/env python3
"""Draw docs/results.md's charts from the raw measurements kept in docs/measurements/ (outputs of
tools/gpu_check.sh on a lent H100):

    python tools/plot_results.py            # -> docs/learning_curves.png, docs/step_profile.png
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alexnet_pipeline import plot  # noqa: E402

MEASURED, DOCS = ROOT / "docs" / "measurements", ROOT / "docs"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    runs = {f"{init} init": _jsonl(MEASURED / f"h100_learn_{init}.jsonl") for init in ("paper", "caffe")}
    plot.plot_learning(runs, DOCS / "learning_curves.png", reference=math.log(1000))
    steps = json.loads((MEASURED / "h100_step_profile.json").read_text())["images_per_s"]
    steps.pop("+compile")  # measured again with conv1 over space-to-depth blocks, in the run below
    steps.update(json.loads((MEASURED / "h100_step_profile_s2d.json").read_text())["images_per_s"])
    plot.plot_bars(steps, DOCS / "step_profile.png", "H100, synthetic batch: each change added to the one above",
                   "images/s", highlight=("before", "+compile"))
    for name in ("learning_curves.png", "step_profile.png"):
        print(DOCS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
