#!/usr/bin/env python3
"""alexnet-prep at ImageNet's counts: a tree of ImageNet's shape built from hard links, and prep run on it under
a given open-file limit and worker count, watched from outside.

    python tools/scale_check.py make TREE [--classes 1000 --train-per-class 1281 --val-per-class 50]
    python tools/scale_check.py run TREE OUT [--workers 16 --nofile 1024 --shard-size 1000 --verify
                                             --record scale.json --every 0.5]

`make` writes a few hundred distinct small photo-like JPEGs (tools/make_sample_imagenet.py's pictures) and
hard-links them into TREE/train/<wnid>/<wnid>_<i>.JPEG and TREE/val/<wnid>/ILSVRC2012_val_<n>.JPEG: listing,
planning, the global shuffle and the shard stage meet the real counts (1,331,000 files by default) while the
images stay cheap to decode. Hard links take no space; the prepared output does (about 15 KiB per image).

`run` runs `alexnet-prep --imagenet-root TREE --out OUT --workers N` with RLIMIT_NOFILE set to `--nofile`
(soft and hard, as `ulimit -n` sets them), samples the process tree every half second and reports:
- each stage's time and rate (prep's own `stage ...` summary lines: listing, images, shards per split);
- memory as PSS (proportional set size: pages shared after fork counted once, split among their sharers; RSS
  would count the parent's listing again in every worker), the parent's peak and the largest worker's peak,
  with RSS beside it;
- the peak number of open descriptors of the parent and of any worker;
- a second run over the finished output ("nothing to do") against `find TREE -type f -printf '%s %T@\\n'` in the
  same command (median of `--repeats` each, alternating);
- with `--verify`, `alexnet-prep --verify OUT --workers N` and its time.
The result is printed as a table and, with `--record`, written as JSON (rewritten as each part finishes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

PREP = [sys.executable, "-m", "alexnet_pipeline", "prep"]
STAGE_LINE = re.compile(r"^stage (?P<stage>.+?): (?P<count>[\d,]+) (?P<unit>\S+) in (?P<seconds>[\d.]+) s", re.M)


# ---- the tree -------------------------------------------------------------------------------------------

def make_tree(tree: Path, classes: int, train_per_class: int, val_per_class: int, distinct: int, seed: int) -> dict:
    """TREE/train/<wnid>/ and TREE/val/<wnid>/ of hard links to `distinct` small JPEGs kept in TREE/.pool/ (a
    dot-folder, which prep does not read). Returns the counts."""
    import make_sample_imagenet as maker

    rng = np.random.default_rng(seed)
    pool = tree / ".pool"
    pool.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(distinct):
        path = pool / f"{i:05d}.JPEG"
        if not path.exists():
            w = int(rng.integers(64, 161))
            h = int(w * rng.choice([0.75, 1.0, 0.6667, 1.333]))
            buf = io.BytesIO()
            maker.photo(rng, i % 10, 10, (w, h)).save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        sources.append(str(path))
    names = maker.wnids(classes)
    n_val = 0
    for c, wnid in enumerate(names):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            d = tree / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{n_val + 1:08d}.JPEG"
                n_val += split == "val"
                target = d / name
                if not os.path.lexists(target):
                    os.link(sources[(c * 7919 + i * 104729 + (split == "val")) % distinct], target)
    return {"classes": classes, "train": classes * train_per_class, "val": classes * val_per_class,
            "distinct": distinct}


# ---- watching a run -------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for t in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            continue
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in KiB, from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(Pss|Rss):\s+(\d+) kB", text, re.M))
    return int(values.get("Pss", 0)), int(values.get("Rss", 0))


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Watch:
    """Samples a process and its children every `every` seconds until stopped: peak PSS, RSS and open
    descriptors of the parent and of the largest child."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every = pid, every
        self.peak = {"parent_pss_mib": 0.0, "parent_rss_mib": 0.0, "worker_pss_mib": 0.0, "worker_rss_mib": 0.0,
                     "all_pss_mib": 0.0, "parent_open_files": 0, "worker_open_files": 0, "workers_seen": 0}
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        p = self.peak
        pss, rss = _memory_kib(self.pid)
        p["parent_pss_mib"] = max(p["parent_pss_mib"], pss / 1024)
        p["parent_rss_mib"] = max(p["parent_rss_mib"], rss / 1024)
        p["parent_open_files"] = max(p["parent_open_files"], _open_files(self.pid))
        total = pss
        for child in _children(self.pid):
            self._seen.add(child)
            c_pss, c_rss = _memory_kib(child)
            total += c_pss
            p["worker_pss_mib"] = max(p["worker_pss_mib"], c_pss / 1024)
            p["worker_rss_mib"] = max(p["worker_rss_mib"], c_rss / 1024)
            p["worker_open_files"] = max(p["worker_open_files"], _open_files(child))
        p["all_pss_mib"] = max(p["all_pss_mib"], total / 1024)
        p["workers_seen"] = len(self._seen)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in self.peak.items()}


def _limited(nofile: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    return limit


def run_watched(args: list[str], nofile: int, log: Path, every: float) -> dict:
    """Run a command under the open-file limit, watched every `every` seconds; its output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_limited(nofile), cwd=ROOT)
        watch = Watch(proc.pid, every)
        code = proc.wait()
    peaks = watch.stop()
    text = log.read_text(errors="replace")
    stages = {}
    for m in STAGE_LINE.finditer(text):
        count, seconds = int(m["count"].replace(",", "")), float(m["seconds"])
        stages[m["stage"]] = {"count": count, "unit": m["unit"], "seconds": seconds,
                              "per_second": round(count / seconds, 1) if seconds else None}
    return {"exit": code, "seconds": round(time.perf_counter() - t0, 1), "stages": stages, "peaks": peaks,
            "last_lines": text.strip().splitlines()[-3:]}


def timed(args: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - t0


def nothing_to_do_against_find(prep_args: list[str], tree: Path, nofile: int, repeats: int) -> dict:
    """The median time of a re-run over a finished output and of find printing every file's size and time,
    alternating, in this one command."""
    find = ["find", str(tree), "-type", "f", "-printf", "%s %T@\n"]
    timed(find)  # warm-up: the directory entries and inodes in the cache, as for the re-runs
    rerun, finds = [], []
    for _ in range(repeats):
        finds.append(timed(find))
        rerun.append(timed(prep_args, preexec_fn=_limited(nofile), cwd=ROOT))
    return {"rerun_s": round(statistics.median(rerun), 2), "find_s": round(statistics.median(finds), 2),
            "ratio": round(statistics.median(rerun) / statistics.median(finds), 2), "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make", help="build the tree of hard links")
    m.add_argument("tree", type=Path)
    m.add_argument("--classes", type=int, default=1000)
    m.add_argument("--train-per-class", type=int, default=1281)
    m.add_argument("--val-per-class", type=int, default=50)
    m.add_argument("--distinct", type=int, default=300, help="distinct JPEGs the links point to")
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="run alexnet-prep on it, watched")
    r.add_argument("tree", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--workers", type=int, default=16)
    r.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE, soft and hard (ulimit -n)")
    r.add_argument("--shard-size", type=int, default=1000)
    r.add_argument("--repeats", type=int, default=3, help="re-runs and finds timed (median)")
    r.add_argument("--verify", action="store_true", help="also run alexnet-prep --verify on the output")
    r.add_argument("--every", type=float, default=0.5, help="seconds between samples of the process tree")
    r.add_argument("--record", type=Path, help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.what == "make":
        t0 = time.perf_counter()
        counts = make_tree(a.tree, a.classes, a.train_per_class, a.val_per_class, a.distinct, a.seed)
        print(json.dumps({**counts, "seconds": round(time.perf_counter() - t0, 1)}))
        return 0
    result: dict = {"tree": str(a.tree), "workers": a.workers, "nofile": a.nofile, "shard_size": a.shard_size,
                    "cores": len(os.sched_getaffinity(0))}

    def save():
        print(json.dumps(result, indent=1), flush=True)
        if a.record:
            a.record.write_text(json.dumps(result, indent=1) + "\n")

    prep = PREP + ["--imagenet-root", str(a.tree), "--out", str(a.out), "--workers", str(a.workers),
                   "--shard-size", str(a.shard_size)]
    result["prep"] = run_watched(prep, a.nofile, a.out.parent / f"{a.out.name}.prep.log", a.every)
    save()
    if result["prep"]["exit"] != 0:
        return 1
    result["nothing_to_do"] = nothing_to_do_against_find(prep, a.tree, a.nofile, a.repeats)
    save()
    if a.verify:
        result["verify"] = run_watched(PREP + ["--verify", str(a.out), "--workers", str(a.workers)], a.nofile,
                                       a.out.parent / f"{a.out.name}.verify.log", a.every)
        save()
    return 0 if result.get("verify", {"exit": 0})["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
