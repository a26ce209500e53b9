"""alexnet-bench: each stage against the baseline a user would otherwise write, timed in the same process.

Every figure is the median of `repeats` timed runs after one untimed warm-up run, and is reported with the
ratio to the baseline measured in the same command, so machines can be compared by ratios. Loaders are
timed as training uses them: one loader kept across epochs, `steps` batches per repeat.

    prep      alexnet-prep (1 and all workers) against a naive one-process Pillow loop
    pipeline  the DALI loaders against the DataLoader baseline and against decoding alone
    loader    where the loader's ceiling is: decoding alone and the whole train graph (and its CPU side)
              over DALI batch, hardware-decoder share, threads, CPU decoding and prefetch depth
    storage   the sample reader against DALI's own reader, and shards in a store (through the node cache)
              against the same shards on the local disk
    train     the training step fed by a batch held on the device, by DALI and by the DataLoader baseline
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import io
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .config import OptionError, check, option, subset, to_json
from .environment import report as environment_report
from .options import (
    Batch,
    Decoding,
    Device,
    ImageNetRoot,
    LoaderConfig,
    Network,
    Order,
    Output,
    Record,
    Shards,
    Stepping,
    Steps,
    Tensors,
    Timing,
    Workers,
    default_threads,
)


def _recorder(bench):
    """on_row for a stage: rewrites bench.record with the partial result (environment included)."""
    from .files import atomic_write

    def write(result: dict) -> None:
        if bench.record is not None:
            atomic_write(bench.record, (json.dumps({**result, "environment": environment_report()}, indent=1)
                                        + "\n").encode())
    return write


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: page cache, imports, pool start-up code paths
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def _iter_rate(run_epoch, repeats: int, epochs: int, sync=lambda: None) -> float:
    """images/s of `run_epoch` (returns images it produced): one warm-up run, then the median of repeats."""
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


def _stream_rate(batches, steps: int, repeats: int, sync) -> float:
    """images/s of `steps` batches taken from one endless iterator of (images, labels), after a warm-up of
    as many: the loader is kept, as training keeps it."""
    def take():
        n = 0
        for images, _ in itertools.islice(batches, steps):
            n += images.shape[0]
        return n
    return _iter_rate(take, repeats, 1, sync)


def _sync_for(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _print_json_or(result: dict, as_json: bool) -> bool:
    result["environment"] = environment_report()
    if as_json:
        print(json.dumps(result, indent=1))
    return as_json


# ---- prep ------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PrepBench(ImageNetRoot, Workers, Timing, Output):
    """alexnet-prep with 1 worker and with all workers against a naive one-process Pillow loop; then
    alexnet-prep --verify of its output with 1 worker and with all."""

    shard_size: int = option(1000, "samples per shard of the prep timed (--verify reads one shard per task: on a "
                             "small set, smaller shards give its workers a share each)", minimum=1)

    def __post_init__(self):
        check(self)


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


def prep_rates(cfg: PrepBench) -> dict:
    """images/s of the naive loop, alexnet-prep with 1 worker and with `workers` (default: all cores), and of
    alexnet-prep --verify over that output with 1 worker and with `workers`."""
    from .prep import PrepConfig, run
    from .prep.workers import pool
    from .shards import load_manifest, verify

    workers = cfg.workers or _cores()
    files = sorted(p for p in (Path(cfg.imagenet_root) / "train").rglob("*") if p.is_file())
    tmp = Path(tempfile.mkdtemp(prefix="alexnet-bench-"))

    def ours(n):
        def go():
            shutil.rmtree(tmp / "shards", ignore_errors=True)
            run(PrepConfig(cfg.imagenet_root, tmp / "shards", ("train",), workers=n, progress=False,
                           shard_size=cfg.shard_size))
        return go

    def naive():
        shutil.rmtree(tmp / "naive", ignore_errors=True)
        (tmp / "naive").mkdir()
        naive_prep(files, tmp / "naive")

    def checked(n):
        def go():
            with pool(n) as processes:
                problems = verify(tmp / "shards", pool=processes)
            if problems:
                raise RuntimeError("the output prep just wrote does not verify")
        return go

    try:
        rates = {"naive": _median_rate(naive, len(files), cfg.repeats),
                 "prep_1_worker": _median_rate(ours(1), len(files), cfg.repeats),
                 f"prep_{workers}_workers": _median_rate(ours(workers), len(files), cfg.repeats)}
        kept = sum(e.samples for e in load_manifest(tmp / "shards").splits.values())
        verify_rates = {"verify_1_worker": _median_rate(checked(1), kept, cfg.repeats),
                        f"verify_{workers}_workers": _median_rate(checked(workers), kept, cfg.repeats)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(files), "repeats": cfg.repeats, "workers": workers, "images_per_s": rates,
            "ratio_to_naive": {k: v / rates["naive"] for k, v in rates.items()},
            "ratio_all_to_1_worker": rates[f"prep_{workers}_workers"] / rates["prep_1_worker"],
            "verify_images_per_s": verify_rates,
            "verify_all_to_1_worker": verify_rates[f"verify_{workers}_workers"] / verify_rates["verify_1_worker"]}



def _print_prep(cfg: PrepBench, result: dict) -> None:
    print(f"prep on {result['images']} files of {cfg.imagenet_root} (median of {cfg.repeats} after warm-up)")
    print(f"{'':<18}{'images/s':>10}{'x naive':>9}")
    for k, v in result["images_per_s"].items():
        print(f"{k:<18}{v:>10.1f}{result['ratio_to_naive'][k]:>9.2f}")
    print(f"all workers / 1 worker: {result['ratio_all_to_1_worker']:.2f}x   "
          f"({result['environment']['PIL']}, {_cores()} cores)")
    for k, v in result["verify_images_per_s"].items():
        print(f"{k:<18}{v:>10.1f}")
    print(f"verify, all workers / 1 worker: {result['verify_all_to_1_worker']:.2f}x")


# ---- pipeline --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PipelineBench(Shards, Device, Batch, Decoding, Tensors, Timing, Steps, Output):
    """For train and ten-crop eval: (a) the DALI loader, (b) the DataLoader baseline with as many workers,
    PIL and the reference augmentation, (c) decoding alone with the same decoder and threads; for train also
    (a) reading every epoch in the same order (no per-epoch shard shuffle), to show what the new order costs."""

    baseline: bool = option(True, "also time the (slow) DataLoader baseline")

    def __post_init__(self):
        check(self)


def _loader_rate(bench, cfg, train: bool, sync) -> float:
    """images/s of one DALI loader, kept across epochs; its pipeline (and DALI's threads) go when this returns."""
    from .pipeline import Loader

    return _stream_rate(Loader(cfg, train).wait_for_digest().endless(), bench.steps, bench.repeats, sync)


def _run_rate(bench, cfg, train: bool, sync, upto: str) -> tuple[float, LoaderConfig]:
    """images/s of the same pipeline stopped early (pipeline.STAGES): "decode", the decoder's ceiling, or
    "read", the graph's CPU side (reading and the random draws, no image work); and the loader's config (its
    runs set)."""
    from .pipeline import Loader

    loader = Loader(cfg, train, digest=False)
    pipe, cfg = loader.graph(upto=upto), loader.cfg
    runs = -(-bench.steps // cfg.per_run)

    def take():
        for _ in range(runs):
            pipe.run()
        return runs * cfg.run_size
    return _iter_rate(take, bench.repeats, 1, sync), cfg


def _stage_rates(bench: PipelineBench, cfg, train: bool) -> dict:
    """(a), (b) and (c) for one loader configuration."""
    import torch

    from .baseline import baseline_loader

    dev = torch.device(cfg.device)
    sync = _sync_for(dev)
    rates = {"dali": _loader_rate(bench, cfg, train, sync), "decode_only": _run_rate(bench, cfg, train, sync,
                                                                                     "decode")[0]}
    if train:
        rates["dali_same_order"] = _loader_rate(bench, dataclasses.replace(cfg, shard_shuffle=False), train, sync)
    gc.collect()  # DALI's thread pools go with their pipelines
    if bench.baseline:
        base = baseline_loader(cfg, train, workers=cfg.threads)
        rates["baseline"] = _stream_rate(_to_device(itertools.chain.from_iterable(itertools.repeat(base)), dev),
                                         bench.steps, bench.repeats, sync)
    return {"images_per_s": rates, "dali_over_baseline": rates["dali"] / rates["baseline"] if bench.baseline else None,
            "dali_over_decode_only": rates["dali"] / rates["decode_only"]}


def _to_device(batches, device, dtype=None, channels_last=False):
    """The baseline's batches moved to `device` as pytorch/examples does (pinned memory, non-blocking)."""
    import torch

    layout = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in batches:
        if images.device != device or dtype is not None:
            images = images.to(device, dtype, non_blocking=True, memory_format=layout)
            labels = labels.to(device, non_blocking=True)
        yield images, labels


def pipeline_rates(bench: PipelineBench) -> dict:
    """images/s for train and ten-crop eval: (a) DALI loader, (b) DataLoader + PIL baseline, (c) decode only."""

    result = {**to_json(bench), "threads": bench.num_threads or default_threads()}
    for name, train, split, tencrop in (("train", True, "train", False), ("tencrop_eval", False, "val", True)):
        cfg = LoaderConfig(**subset(bench, LoaderConfig), split=split, tencrop=tencrop)
        result[name], result["device"] = _stage_rates(bench, cfg, train), cfg.device
    return result


def _print_pipeline(bench: PipelineBench, result: dict) -> None:
    print(f"pipeline on {bench.shards}, {result['device']} ({bench.dtype}), batch {bench.batch_size}, "
          f"{result['threads']} threads/workers, median of {bench.repeats} x {bench.steps} batches after a warm-up")
    print(f"{'':<14}{'DALI':>10}{'same order':>11}{'baseline':>10}{'decode':>10}{'x base':>8}{'x decode':>9}"
          "   (images/s)")
    nan = float("nan")
    for name in ("train", "tencrop_eval"):
        r, base = result[name]["images_per_s"], result[name]["dali_over_baseline"]
        print(f"{name:<14}{r['dali']:>10.0f}{r.get('dali_same_order', nan):>11.0f}{r.get('baseline', nan):>10.0f}"
              f"{r['decode_only']:>10.0f}{base or nan:>8.2f}{result[name]['dali_over_decode_only']:>9.2f}")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")


# ---- loader: where the ceiling is ----------------------------------------------------------------------

# Each axis is a list of changes, each tried alone around the defaults (the bench's own Decoding options).
# hw_threads pairs them: the hardware decoder's share and the hybrid (CPU Huffman) share's threads interact.
LOADER_AXES: dict[str, list[dict]] = {
    "batches_per_run": [{"batches_per_run": k} for k in (1, 2, 4, 8)],
    "hw_threads": [{"hw_decoder_load": h, "num_threads": t} for h in (0.65, 0.9) for t in (8, 14, 16)],
    "hw_decoder_load": [{"hw_decoder_load": h} for h in (0.0, 0.65, 0.9, 1.0)],
    "num_threads": [{"num_threads": t} for t in (6, 8, 14, 16)],
    "decoder": [{"decoder": "cpu"}],
    "prefetch": [{"prefetch": k} for k in (2, 4, 6)],
    "preallocate": [{"preallocate": True}],
    "stream_ordered": [{"stream_ordered": True}],
    "crop_decode": [{"crop_decode": True}, {"decoder": "cpu", "crop_decode": True}],
}
GPU_ONLY = {"hw_threads", "hw_decoder_load", "decoder", "preallocate", "stream_ordered"}


@dataclass(kw_only=True)
class LoaderBench(Shards, Device, Batch, Decoding, Timing, Steps, Output, Record):
    """The loader alone, no training: images/s of decoding alone ("decode") and of the whole train graph
    ("train", the batches training gets, in training's dtype and layout) for each setting of the axes, one
    change at a time around the defaults; and the graph's CPU side alone ("read": reading and the random
    draws, host and DALI)."""

    axes: tuple[str, ...] = option(tuple(LOADER_AXES), "axes to vary", choices=tuple(LOADER_AXES))
    what: tuple[str, ...] = option(("train", "decode", "read"), "rows to time: train (the whole graph), decode "
                                   "(decoding alone), read (the graph's CPU side)", choices=("train", "decode", "read"))

    def __post_init__(self):
        check(self)


def _base_loader(bench: LoaderBench):
    """The defaults' LoaderConfig: the bench's options, in the dtype and layout alexnet-train feeds its step."""
    from .build import batch_format
    from .options import resolve_device

    device = resolve_device(bench.device)
    return LoaderConfig(**{**subset(bench, LoaderConfig), "device": str(device), **batch_format(device)},
                        split="train")


def loader_rows(bench: LoaderBench) -> list[dict]:
    """The settings to time: the defaults, then one change at a time (GPU-only axes on GPUs only); a change
    that equals the defaults (16 threads on 16 cores) or asks for more threads than cores is left out."""
    base = _base_loader(bench)
    # what the defaults resolve to here: a change equal to them (16 threads on 16 cores, decoder=cpu on the CPU)
    resolved = {**dataclasses.asdict(base), "num_threads": base.threads, "decoder": "mixed" if base.gpu_decoding
                else "cpu"}
    settings: list[dict] = [{}]
    seen: set[tuple] = {()}
    for axis in bench.axes:
        if axis in GPU_ONLY and not base.on_gpu:
            continue
        for change in LOADER_AXES[axis]:
            if change.get("num_threads", 0) > _cores():
                continue
            key = tuple(sorted((k, v) for k, v in change.items() if resolved[k] != v))
            if key not in seen:
                seen.add(key)
                settings.append(dict(key))
    # the rows that decide defaults first (a round cut short keeps them), then decoding alone, then the CPU side
    rows = [{"what": what, **s} for what in ("train", "decode") if what in bench.what for s in settings]
    return rows + [{"what": "read", "draws": d} for d in ("host", "dali") if "read" in bench.what]


def loader_rates(bench: LoaderBench) -> dict:
    """images/s of every row of loader_rows, each on a pipeline built for it and kept while it is timed; the
    result so far goes to bench.record after each row. The shards' background digest runs once, for the first
    row's loader (the rows read the same shards)."""
    import torch

    from .pipeline import Loader

    base, on_row = _base_loader(bench), _recorder(bench)
    sync = _sync_for(torch.device(base.device))
    result = {**to_json(bench), "device": base.device, "dtype": base.dtype, "channels_last": base.channels_last,
              "rows": []}
    digest = True
    for row in loader_rows(bench):
        cfg = dataclasses.replace(base, **{k: v for k, v in row.items() if k != "what"})
        if row["what"] == "train":
            loader = Loader(cfg, True, digest=digest).wait_for_digest()
            digest = False
            rate = _stream_rate(loader.endless(), bench.steps, bench.repeats, sync)
            cfg = loader.cfg  # its runs set
            del loader
        else:
            rate, cfg = _run_rate(bench, cfg, True, sync, row["what"])
        result["rows"].append({**row, "dali_batch": cfg.run_size, "threads": cfg.threads, "images_per_s": rate})
        gc.collect()  # this row's pipeline and threads go before the next one's
        on_row(result)
    return result


def _print_loader(bench: LoaderBench, result: dict) -> None:
    print(f"the loader alone on {bench.shards}, {result['device']}, batch {bench.batch_size}, median of "
          f"{bench.repeats} x {bench.steps} batches after a warm-up (defaults, then one change per row)")
    print(f"{'what':<8}{'change':<28}{'DALI batch':>11}{'threads':>8}{'images/s':>11}")
    for r in result["rows"]:
        change = ", ".join(f"{k}={v}" for k, v in r.items()
                           if k not in ("what", "dali_batch", "threads", "images_per_s")) or "defaults"
        print(f"{r['what']:<8}{change:<28}{r['dali_batch']:>11}{r['threads']:>8}{r['images_per_s']:>11.0f}")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")


# ---- train -----------------------------------------------------------------------------------------------

FEEDS = "synthetic, dataloader, dali (the loader's defaults), dali-cpu (CPU decoding), dali-hwX (nvJPEG with " \
        "hw_decoder_load X), dali-runK (K batches per DALI run)"


def _dali_overrides(feed: str) -> dict:
    """Loader options of a DALI feed name (see FEEDS)."""
    if feed == "dali":
        return {}
    if feed == "dali-cpu":
        return {"decoder": "cpu"}
    for prefix, name, kind in (("dali-hw", "hw_decoder_load", float), ("dali-run", "batches_per_run", int)):
        if feed.startswith(prefix):
            try:
                return {**({"decoder": "mixed"} if prefix == "dali-hw" else {}), name: kind(feed[len(prefix):])}
            except ValueError:
                break
    raise OptionError(f"option feeds: unknown feed {feed!r} (feeds: {FEEDS})")


@dataclass(kw_only=True)
class TrainBench(Shards, Device, Batch, Decoding, Network, Stepping, Timing, Steps, Output, Record):
    """images/s of one training step (model, loss, backward, optimizer, built as alexnet-train builds it)
    fed by each of `feeds`: a batch held on the device (synthetic, the ceiling), the DALI train loader (with
    its decoding variants, each loader built once and kept across epochs, as alexnet-train keeps it) and the
    DataLoader baseline (workers + PIL + the reference augmentation, what pytorch/examples' ImageNet script
    does). Also the achieved TFLOP/s beside a bf16 matrix product's."""

    baseline_workers: int | None = option(None, "DataLoader workers of the baseline feed (default: cores)",
                                          minimum=1)
    feeds: str = option("synthetic,dali,dataloader", f"comma-separated feeds to time: {FEEDS}")
    profile: bool = option(False, "also print the GPU kernels a synthetic step spends its time in")

    def __post_init__(self):
        check(self)
        names = self.feeds.split(",")
        if "synthetic" not in names:
            raise OptionError("option feeds: synthetic is the reference of the ratios; include it")
        for feed in names:
            if feed not in ("synthetic", "dataloader"):
                _dali_overrides(feed)


def matmul_tflops(device, size: int = 8192, repeats: int = 20) -> float:
    """A bf16 matrix product's rate on `device`, timed with CUDA events: what the GPU reaches on dense
    matrix work here, the ceiling the training step's TFLOP/s is read against."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def kernel_table(run_steps, steps: int, rows: int = 12) -> dict:
    """The GPU kernels `run_steps()` (which runs `steps` steps) spends its device time in, per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {"device_ms_per_step": total / steps / 1e3,
            "top": [{"kernel": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1e3,
                     "share": e.self_device_time_total / total, "calls_per_step": e.count / steps}
                    for e in kernels[:rows]]}


def bench_run_config(bench: TrainBench):
    """The TrainConfig alexnet-train would run with the bench's options (the recipe's defaults otherwise)."""
    from .train import TrainConfig

    return TrainConfig(**subset(bench, TrainConfig), out=Path(tempfile.gettempdir()), global_batch=bench.batch_size)


def train_rates(bench: TrainBench) -> dict:
    """Training images/s of the same model and step fed by each of bench.feeds, and ratios to synthetic."""
    import torch

    from . import build
    from .baseline import baseline_loader
    from .distributed import World
    from .model import flops_per_image
    from .options import resolve_device
    from .pipeline import Loader
    from .shards import load_manifest

    dev = resolve_device(bench.device)
    sync, world = _sync_for(dev), World(0, 1, 0, dev)
    cfg = bench_run_config(bench)
    parts = build.build_parts(cfg, len(load_manifest(cfg.shards).classes), world)
    held, kernels, on_row = None, None, _recorder(bench)
    rates: dict[str, float] = {}
    flops = flops_per_image(parts.net.cfg)["train_flops"]

    def summary() -> dict:
        result = {**to_json(bench), "device": str(dev), "threads": bench.num_threads or default_threads(),
                  "images_per_s": dict(rates),
                  "over_synthetic": {k: v / rates["synthetic"] for k, v in rates.items() if "synthetic" in rates},
                  "train_flops_per_image": flops, "tflops": {k: v * flops / 1e12 for k, v in rates.items()},
                  "matmul_bf16_tflops": None}
        if "dali" in rates and "dataloader" in rates:
            result["dali_over_dataloader"] = rates["dali"] / rates["dataloader"]
        return result

    def rate(batches) -> float:
        def steps():
            for images, labels in itertools.islice(batches, bench.steps):
                parts.step(images, labels)
            return bench.steps * bench.batch_size
        return _iter_rate(steps, bench.repeats, 1, sync)

    for feed in bench.feeds.split(","):
        if feed == "dataloader":
            lcfg = build.loader_config(cfg, world, "train")
            base = baseline_loader(lcfg, True, workers=bench.baseline_workers or _cores(),
                                   pin_memory=dev.type == "cuda", drop_last=True)
            stream = itertools.chain.from_iterable(itertools.repeat(base))
            rates[feed] = rate(_to_device(stream, dev, getattr(torch, lcfg.dtype), lcfg.channels_last))
            on_row(summary())
            continue
        loader = Loader(build.loader_config(dataclasses.replace(cfg, **_dali_overrides(feed)) if feed != "synthetic"
                                            else cfg, world, "train"), True).wait_for_digest()
        if feed == "synthetic":  # one batch of the pipeline's own dtype, layout and device, held
            held = [t.clone() for t in next(iter(loader))]
            rates[feed] = rate(itertools.repeat(held))
            if bench.profile and dev.type == "cuda":
                kernels = kernel_table(lambda held=held: [parts.step(*held) for _ in range(bench.steps)], bench.steps)
        else:
            rates[feed] = rate(loader.endless())
        del loader
        gc.collect()  # free that feed's DALI pipeline and threads before the next one
        on_row(summary())
    result = summary()
    result["matmul_bf16_tflops"] = matmul_tflops(dev) if dev.type == "cuda" else None
    if kernels is not None:
        result["kernels"] = kernels
    return result


def _print_train(bench: TrainBench, result: dict) -> None:
    precision = bench.precision if result["device"].startswith("cuda") else "fp32"
    print(f"train step, {bench.variant} AlexNet width {bench.width} on {result['device']} ({precision}), batch "
          f"{bench.batch_size}, {result['threads']} DALI threads, median of {bench.repeats} x {bench.steps} steps "
          f"after a warm-up; {result['train_flops_per_image'] / 1e9:.2f} GFLOP per image")
    print(f"{'feed':<14}{'images/s':>10}{'x synthetic':>13}{'TFLOP/s':>9}")
    for feed, r in result["images_per_s"].items():
        print(f"{feed:<14}{r:>10.0f}{result['over_synthetic'][feed]:>13.2f}{result['tflops'][feed]:>9.1f}")
    if "dali_over_dataloader" in result:
        print(f"dali / dataloader: {result['dali_over_dataloader']:.1f}x")
    if result["matmul_bf16_tflops"]:
        print(f"a bf16 8192^3 matrix product on this GPU: {result['matmul_bf16_tflops']:.0f} TFLOP/s")
    if "kernels" in result:
        k = result["kernels"]
        print(f"where a synthetic step's GPU time goes ({k['device_ms_per_step']:.2f} ms of kernels per step):")
        for row in k["top"]:
            print(f"  {row['ms_per_step']:7.3f} ms {row['share']:6.1%} {row['calls_per_step']:5.1f}x  {row['kernel']}")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")


# ---- storage ----------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class StorageBench(Shards, Batch, Order, Decoding, Timing, Output, Record):
    """The train loader on the CPU (the whole graph, as alexnet-train uses it), images/s of whole epochs, each
    row against the local loader in the same run: this package's sample reader against DALI's own webdataset
    reader; the reader alone (bytes and labels into DALI, no decoding); and the same shards in a store (an S3
    server on this machine, moto's, behind a proxy adding --latency-ms to every request, both at nice 19; or
    --store) through the node cache: the first epoch (nothing cached; against the local loader's first epoch,
    both timed from the loader's construction), later epochs, and an epoch after the first with --cache-size a
    quarter of the split; DALI's own s3:// reading for the record."""

    store: str | None = option(None, "a URL holding the same shards (alexnet-prep --out URL); default: publish "
                               "them to an S3 server started on this machine")
    latency_ms: float = option(20.0, "the local S3 server's delay per request (a real store answers in 10-50 ms)",
                               minimum=0.0)
    dali_s3: bool = option(True, "also time DALI's own reading of s3:// shards, once, a tenth of an epoch (for "
                           "the record)")

    def __post_init__(self):
        check(self)


def _epoch_rate(make, epochs: int, skip: int = 0) -> float:
    """images/s of `epochs` whole epochs of a loader made by `make()`, after `skip` untimed ones; from the
    loader's construction when skip is 0 (a cold cache fetches from then on)."""
    t0 = time.perf_counter()
    loader = make()
    for _ in range(skip):
        for _ in loader:
            pass
    if skip:
        t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for _images, labels in loader:
            n += int((labels >= 0).sum())
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def _cpu_seconds() -> float:
    """CPU seconds this process has used, all its threads (DALI's among them), to the nanosecond (os.times
    counts 10 ms ticks: a short row would read as no CPU at all)."""
    return time.process_time()


def _pipe_rate(pipe, runs: int, size: int) -> float:
    """samples/s of `runs` runs of a DALI pipeline."""
    t0 = time.perf_counter()
    for _ in range(runs):
        pipe.run()
    return runs * size / (time.perf_counter() - t0)


BASELINE = {"store_first_epoch": "local_first_epoch"}  # a row's reference, where it is not "local"


def storage_rates(bench: StorageBench) -> dict:
    """images/s of each row (see StorageBench): rounds of every row in turn, the first a warm-up, then the
    median of `repeats` rounds per row (rows in turn, so that a machine's drift does not favour one)."""
    from contextlib import ExitStack

    from . import storage
    from .pipeline import Loader, webdataset_pipeline
    from .prep.publish import publish
    from .shards import load_manifest, shard_paths

    if storage.is_url(bench.shards):
        raise OptionError("option shards: the local copy of the shards (--store names the store)")
    local = LoaderConfig(**subset(bench, LoaderConfig), split="train", device="cpu")
    entries = load_manifest(bench.shards).splits["train"].shards
    quarter = sum(e.bytes for e in entries) // 4
    result = {**to_json(bench), "samples": sum(e.samples for e in entries), "shards": len(entries),
              "quarter_bytes": quarter, "images_per_s": {}, "rounds": [], "server_cpu_share": {}, "cores_busy": {}}
    on_row = _recorder(bench)
    tmp = Path(tempfile.mkdtemp(prefix="alexnet-bench-"))

    def cold(cfg, skip: int = 0) -> float:  # a fresh cache: the first epoch fetches everything
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        return _epoch_rate(lambda: Loader(cfg, True, digest=False), 1, skip)

    try:
        with ExitStack() as stack:
            url, server = bench.store, None
            if url is None:
                from .loopback import Loopback

                # nice: the server's work takes what the loader leaves idle (a real store's is on other machines)
                s3 = server = stack.enter_context(Loopback(bench.latency_ms / 1000, proxy_process=True, nice=19))
                stack.callback(os.environ.update, dict(os.environ))  # its endpoint and credentials go with it
                stack.callback(os.environ.clear)
                os.environ.update(s3.env)
                s3.make_bucket("bench")
                url = "s3://bench/shards"
                publish(Path(bench.shards), url)
            remote = dataclasses.replace(local, shards=url, cache_dir=tmp / "cache")
            budget = dataclasses.replace(remote, cache_size=str(quarter))
            paths = shard_paths(bench.shards, "train")
            reader = Loader(local, True, digest=False)
            runs = reader.runs  # whole epochs
            alone = {"reader_alone": reader.graph(upto="samples"),
                     "dali_reader_alone": webdataset_pipeline(reader, paths, "samples")}
            # a first epoch counts from the loader's construction (the store's: its first fetches), against the
            # local loader's first epoch timed the same way; the other rows time an epoch after an untimed one
            rows: dict[str, Callable[[], float]] = {
                "local": lambda: _epoch_rate(lambda: Loader(local, True, digest=False), 1, skip=1),
                "local_first_epoch": lambda: _epoch_rate(lambda: Loader(local, True, digest=False), 1),
                "dali_reader": lambda: _epoch_rate(lambda: _reference(local, paths), 1, skip=1),
                "store_first_epoch": lambda: cold(remote),
                "store_cached": lambda: _epoch_rate(lambda: Loader(remote, True, digest=False), 1, skip=1),
                "store_quarter_cache": lambda: cold(budget, skip=1)}
            for name, pipe in alone.items():
                rows[name] = functools.partial(_pipe_rate, pipe, runs, reader.cfg.run_size)
            shares: dict[str, list[float]] = {k: [] for k in rows if k.startswith("store")}
            busy: dict[str, list[float]] = {k: [] for k in rows}

            def timed(name: str) -> float:
                """The row's images/s; meanwhile, the cores this process kept busy and the server's share."""
                served, t0, cpu = server.cpu_seconds() if server else 0.0, time.perf_counter(), _cpu_seconds()
                rate = rows[name]()
                seconds = time.perf_counter() - t0
                busy[name].append((_cpu_seconds() - cpu) / seconds)
                if server and name in shares:
                    shares[name].append((server.cpu_seconds() - served) / seconds / _cores())
                return rate

            for round_ in range(bench.repeats + 1):  # round 0: the warm-up
                measured = {name: timed(name) for name in rows}
                if round_:
                    result["rounds"].append(measured)
                    result["server_cpu_share"] = {k: statistics.median(v[1:]) for k, v in shares.items() if server}
                    result["cores_busy"] = {k: statistics.median(v[1:]) for k, v in busy.items()}
                    rates = {k: statistics.median(r[k] for r in result["rounds"]) for k in rows}
                    result["images_per_s"] = rates
                    result["over_local"] = {k: v / rates[BASELINE.get(k, "local")] for k, v in rates.items()}
                    on_row(result)
            if bench.dali_s3 and url.startswith("s3://"):  # a request per sample: once, a tenth of the runs
                urls = [storage.join(url, "train", e.name) for e in entries]
                pipe = webdataset_pipeline(reader, urls)
                pipe.run()  # its first run waits for its 4,096-sample shuffle buffer to fill
                rate = _pipe_rate(pipe, max(1, runs // 10), reader.cfg.run_size)
                result["images_per_s"]["dali_s3"] = rate
                result["over_local"]["dali_s3"] = rate / result["images_per_s"]["local"]
                on_row(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _reference(cfg, locations):
    """A train Loader whose graph reads with DALI's own webdataset reader over `locations` (paths or s3:// URLs):
    the same iteration, conversion to torch and slicing as the Loader's, only the reader differs (padding
    marks aside)."""
    from .pipeline import Loader, webdataset_pipeline

    loader = Loader(cfg, True, digest=False)
    loader.pipe = webdataset_pipeline(loader, locations)
    return loader


def _print_storage(bench: StorageBench, result: dict) -> None:
    print(f"the train loader on the CPU over {result['samples']:,} samples in {result['shards']} shards, batch "
          f"{bench.batch_size}, {bench.num_threads or default_threads()} threads; whole epochs, median of "
          f"{bench.repeats} rounds after a warm-up round; the store: {bench.store or 'S3 on this machine'}"
          + (f", {bench.latency_ms:g} ms per request" if bench.store is None else ""))
    print(f"{'row':<22}{'images/s':>12}{'x local':>9}{'cores busy':>12}   (store_first_epoch: x local_first_epoch)")
    for name, rate in result["images_per_s"].items():
        busy = result["cores_busy"].get(name)
        print(f"{name:<22}{rate:>12,.0f}{result['over_local'][name]:>9.2f}" + (f"{busy:>12.2f}" if busy else ""))
    print(f"(reader rows: samples/s of bytes and labels into DALI; quarter cache: {result['quarter_bytes']:,} bytes; "
          f"cores busy: this process's CPU seconds per second, of {_cores()})")
    if result["server_cpu_share"]:
        print("the S3 server and proxy on this machine took, of its cores: " + ", ".join(
            f"{k} {v:.0%}" for k, v in result["server_cpu_share"].items()))


STAGES: dict[type, tuple[Callable, Callable]] = {
    PrepBench: (prep_rates, _print_prep), PipelineBench: (pipeline_rates, _print_pipeline),
    LoaderBench: (loader_rates, _print_loader), TrainBench: (train_rates, _print_train),
    StorageBench: (storage_rates, _print_storage)}


def main(bench) -> int:
    """Run one stage's benchmark and print its table (or JSON)."""
    run, show = STAGES[type(bench)]
    result = run(bench)
    if not _print_json_or(result, bench.json):
        show(bench, result)
    return 0
