"""alexnet-bench: each stage against the baseline a user would otherwise write, timed in the same process.

Every figure is the median of `repeats` timed runs after one untimed warm-up run, and is reported with the
ratio to the baseline measured in the same command, so machines can be compared by ratios.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from .environment import report as environment_report


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: page cache, imports, pool start-up code paths
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def naive_prep(files: list[Path], out: Path, size: int = 256, quality: int = 95) -> int:
    """What a user writes first: decode whole, resize short side, crop, save; one process. Returns images done."""
    done = 0
    for f in files:
        try:
            im = Image.open(f).convert("RGB")
        except (OSError, SyntaxError, ValueError):
            continue  # the naive loop also survives bad files; it just does not report them
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        buf = io.BytesIO()
        im.crop((left, top, left + size, top + size)).save(buf, "JPEG", quality=quality)
        (out / f"{f.stem}.jpg").write_bytes(buf.getvalue())
        done += 1
    return done


def prep_rates(root: Path, repeats: int = 3, workers: int | None = None) -> dict:
    """images/s of the naive loop, alexnet-prep with 1 worker and with `workers` (default: all cores)."""
    from .prep import PrepConfig, run

    workers = workers or len(os.sched_getaffinity(0))
    files = sorted(p for p in (Path(root) / "train").rglob("*") if p.is_file())
    tmp = Path(tempfile.mkdtemp(prefix="alexnet-bench-"))

    def ours(n):
        def go():
            shutil.rmtree(tmp / "shards", ignore_errors=True)
            run(PrepConfig(root, tmp / "shards", ("train",), workers=n, progress=False))
        return go

    def naive():
        shutil.rmtree(tmp / "naive", ignore_errors=True)
        (tmp / "naive").mkdir()
        naive_prep(files, tmp / "naive")

    try:
        rates = {"naive": _median_rate(naive, len(files), repeats),
                 "prep_1_worker": _median_rate(ours(1), len(files), repeats),
                 f"prep_{workers}_workers": _median_rate(ours(workers), len(files), repeats)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(files), "repeats": repeats, "workers": workers, "images_per_s": rates,
            "ratio_to_naive": {k: v / rates["naive"] for k, v in rates.items()},
            "ratio_all_to_1_worker": rates[f"prep_{workers}_workers"] / rates["prep_1_worker"]}


def prep_main(root: Path, repeats: int, workers: int | None, as_json: bool) -> int:
    result = prep_rates(root, repeats, workers)
    result["environment"] = environment_report()
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"prep on {result['images']} files of {root} (median of {repeats} after warm-up)")
    print(f"{'':<18}{'images/s':>10}{'x naive':>9}")
    for k, v in result["images_per_s"].items():
        print(f"{k:<18}{v:>10.1f}{result['ratio_to_naive'][k]:>9.2f}")
    print(f"all workers / 1 worker: {result['ratio_all_to_1_worker']:.2f}x   "
          f"({result['environment']['PIL']}, {os.cpu_count()} cores)")
    return 0


# ---- pipeline --------------------------------------------------------------------------------------------

def _iter_rate(run_epoch, repeats: int, epochs: int, sync=lambda: None) -> float:
    """images/s of `run_epoch` (returns images it produced): one warm-up epoch, then the median of repeats."""
    run_epoch()
    sync()
    rates = []
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        for _ in range(epochs):
            n += run_epoch()
        sync()  # device work is asynchronous: wait before reading the clock
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _count(loader, device=None):
    n = 0
    for images, _ in loader:
        if device is not None and images.device.type != device.type:
            images = images.to(device, non_blocking=True)  # the baseline's copy to the GPU counts too
        n += images.shape[0]
    return n


def _stage_rates(cfg, train: bool, repeats: int, epochs: int, baseline: bool, extra: dict) -> dict:
    """(a), (b) and (c) for one loader configuration; its pipelines are freed when this returns."""
    import torch

    from .baseline import baseline_loader
    from .pipeline import Loader, build_pipeline

    dev = torch.device(cfg.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ours = Loader(cfg, train)
    ceiling_pipe = build_pipeline(cfg, train, decode_only=True)[0]

    def ceiling():
        for _ in range(len(ours)):
            ceiling_pipe.run()
        return len(ours) * cfg.batch_size

    rates = {"dali": _iter_rate(lambda: _count(ours), repeats, epochs, sync),
             "decode_only": _iter_rate(ceiling, repeats, epochs, sync)}
    if baseline:
        base = baseline_loader(cfg.shards, cfg.batch_size, workers=cfg.num_threads, train=train, **extra)
        rates["baseline"] = _iter_rate(lambda: _count(base, dev), repeats, epochs, sync)
    return {"images_per_s": rates, "dali_over_baseline": rates["dali"] / rates["baseline"] if baseline else None,
            "dali_over_decode_only": rates["dali"] / rates["decode_only"]}


def pipeline_rates(shards_dir: Path, batch_size: int = 64, threads: int | None = None, repeats: int = 5,
                   epochs: int = 2, device: str = "cpu", dtype: str = "float32", baseline: bool = True) -> dict:
    """images/s for train and ten-crop eval: (a) DALI loader, (b) DataLoader + PIL baseline, (c) decode only."""
    from .pipeline import LoaderConfig

    threads = threads or len(os.sched_getaffinity(0))
    result = {"batch_size": batch_size, "threads": threads, "device": device, "dtype": dtype, "repeats": repeats,
              "epochs_per_repeat": epochs}
    for name, train, split, extra in (("train", True, "train", {}), ("tencrop_eval", False, "val", {"tencrop": True})):
        cfg = LoaderConfig(shards_dir, split, batch_size, device, num_threads=threads, dtype=dtype, **extra)
        result[name] = _stage_rates(cfg, train, repeats, epochs, baseline, extra)
    return result


def pipeline_main(shards_dir: Path, batch_size, threads, repeats, epochs, device, dtype, baseline, as_json) -> int:
    result = pipeline_rates(shards_dir, batch_size, threads, repeats, epochs, device, dtype, baseline)
    result["environment"] = environment_report()
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"pipeline on {shards_dir}, {device} ({dtype}), batch {batch_size}, {result['threads']} threads/workers, "
          f"median of {repeats} x {epochs} epochs after a warm-up epoch")
    print(f"{'':<14}{'DALI':>10}{'baseline':>10}{'decode':>10}{'x base':>8}{'x decode':>9}   (images/s)")
    for name in ("train", "tencrop_eval"):
        r, base = result[name]["images_per_s"], result[name]["dali_over_baseline"]
        print(f"{name:<14}{r['dali']:>10.0f}{r.get('baseline', float('nan')):>10.0f}{r['decode_only']:>10.0f}"
              f"{base or float('nan'):>8.2f}{result[name]['dali_over_decode_only']:>9.2f}")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")
    return 0


# ---- train -----------------------------------------------------------------------------------------------

def train_rates(shards_dir: Path, batch_size: int = 128, steps: int = 20, repeats: int = 5, device: str = "auto",
                threads: int | None = None, width: float = 1.0, variant: str = "paper", compile_: bool = False) -> dict:
    """Training images/s of the same model and step fed by (a) one batch held on the device (synthetic: the
    ceiling) and (b) the real DALI train pipeline; the ratio says how much the data costs the GPU."""
    import itertools

    import torch

    from .distributed import World, resolve_device
    from .model import AlexNet, AlexNetConfig, place
    from .pipeline import Loader
    from .train import TrainConfig, loader_config, sgd, train_step

    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = TrainConfig(shards_dir, Path(tempfile.gettempdir()), batch_size=batch_size, threads=threads)
    loader = Loader(loader_config(cfg, World(0, 1, 0, dev), "train"), train=True)
    net = place(AlexNet(AlexNetConfig(len(loader.classes), variant, width)), dev)
    model = torch.compile(net) if compile_ else net
    optimizer = sgd(cfg, net)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # epoch after epoch
    held = [t.clone() for t in next(stream)]  # same dtype, layout and device as the pipeline's batches

    def run(source):
        def steps_of():
            for _ in range(steps):
                train_step(model, optimizer, *source())
            return steps * batch_size
        return steps_of

    rates = {"synthetic": _iter_rate(run(lambda: held), repeats, 1, sync),
             "real": _iter_rate(run(lambda: next(stream)), repeats, 1, sync)}
    return {"batch_size": batch_size, "steps_per_repeat": steps, "repeats": repeats, "device": str(dev),
            "variant": variant, "width": width, "compile": compile_, "threads": loader.pipe.num_threads,
            "images_per_s": rates, "real_over_synthetic": rates["real"] / rates["synthetic"]}


def train_main(shards_dir: Path, batch_size, steps, repeats, device, threads, width, variant, compile_,
               as_json) -> int:
    result = train_rates(shards_dir, batch_size, steps, repeats, device, threads, width, variant, compile_)
    result["environment"] = environment_report()
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    r = result["images_per_s"]
    print(f"train step, {variant} AlexNet width {width} on {result['device']}, batch {batch_size}, "
          f"median of {repeats} x {steps} steps after a warm-up")
    print(f"synthetic (batch held on device) {r['synthetic']:>9.0f} images/s")
    print(f"real (DALI pipeline)             {r['real']:>9.0f} images/s   "
          f"{result['real_over_synthetic']:.2f}x synthetic")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")
    return 0
