"""alexnet-bench: each stage against the baseline a user would otherwise write, timed in the same process.

Every figure is the median of `repeats` timed runs after one untimed warm-up run, and is reported with the
ratio to the baseline measured in the same command, so machines can be compared by ratios.
"""

from __future__ import annotations

import dataclasses
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

from PIL import Image

from .config import OptionError, check, option, to_json
from .environment import report as environment_report


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


def _print_json_or(result: dict, as_json: bool) -> bool:
    result["environment"] = environment_report()
    if as_json:
        print(json.dumps(result, indent=1))
    return as_json


# ---- prep ------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PrepBench:
    """alexnet-prep with 1 worker and with all workers against a naive one-process Pillow loop."""

    imagenet_root: Path = option(Path("data/sample/extracted"), "ImageNet tree whose train split is prepared")
    repeats: int = option(3, "timed repeats (median), after a warm-up", minimum=1)
    workers: int | None = option(None, "the 'all workers' count (default: cores)", minimum=1)
    json: bool = option(False, "print one JSON object instead of a table")

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
    """images/s of the naive loop, alexnet-prep with 1 worker and with `workers` (default: all cores)."""
    from .prep import PrepConfig, run

    workers = cfg.workers or _cores()
    files = sorted(p for p in (cfg.imagenet_root / "train").rglob("*") if p.is_file())
    tmp = Path(tempfile.mkdtemp(prefix="alexnet-bench-"))

    def ours(n):
        def go():
            shutil.rmtree(tmp / "shards", ignore_errors=True)
            run(PrepConfig(cfg.imagenet_root, tmp / "shards", ("train",), workers=n, progress=False))
        return go

    def naive():
        shutil.rmtree(tmp / "naive", ignore_errors=True)
        (tmp / "naive").mkdir()
        naive_prep(files, tmp / "naive")

    try:
        rates = {"naive": _median_rate(naive, len(files), cfg.repeats),
                 "prep_1_worker": _median_rate(ours(1), len(files), cfg.repeats),
                 f"prep_{workers}_workers": _median_rate(ours(workers), len(files), cfg.repeats)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": len(files), "repeats": cfg.repeats, "workers": workers, "images_per_s": rates,
            "ratio_to_naive": {k: v / rates["naive"] for k, v in rates.items()},
            "ratio_all_to_1_worker": rates[f"prep_{workers}_workers"] / rates["prep_1_worker"]}


def _print_prep(cfg: PrepBench, result: dict) -> None:
    print(f"prep on {result['images']} files of {cfg.imagenet_root} (median of {cfg.repeats} after warm-up)")
    print(f"{'':<18}{'images/s':>10}{'x naive':>9}")
    for k, v in result["images_per_s"].items():
        print(f"{k:<18}{v:>10.1f}{result['ratio_to_naive'][k]:>9.2f}")
    print(f"all workers / 1 worker: {result['ratio_all_to_1_worker']:.2f}x   "
          f"({result['environment']['PIL']}, {_cores()} cores)")


# ---- pipeline --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class PipelineBench:
    """For train and ten-crop eval: (a) the DALI loader, (b) the DataLoader baseline with as many workers,
    PIL and the reference augmentation, (c) decoding alone with the same decoder and threads; for train also
    (a) reading every epoch in the same order (no per-epoch shard shuffle), to show what the new order costs."""

    shards: Path = option(Path("data/shards"), "directory written by alexnet-prep")
    batch_size: int = option(64, "images per batch", minimum=1)
    num_threads: int | None = option(None, "DALI threads = baseline workers (default: cores)", minimum=1,
                                     flag="--threads")
    repeats: int = option(5, "timed repeats (median), after a warm-up epoch", minimum=1)
    epochs: int = option(2, "epochs per timed repeat", minimum=1)
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str = option("float32", "output dtype (float16/bfloat16 on a GPU)", choices=("float32", "float16",
                                                                                          "bfloat16"))
    baseline: bool = option(True, "also time the (slow) DataLoader baseline")
    json: bool = option(False, "print one JSON object instead of a table")

    def __post_init__(self):
        check(self)


def _count(loader, device=None):
    n = 0
    for images, _ in loader:
        if device is not None and images.device.type != device.type:
            images = images.to(device, non_blocking=True)  # the baseline's copy to the GPU counts too
        n += images.shape[0]
    return n


def _loader_rate(bench: PipelineBench, cfg, train: bool, sync) -> float:
    """images/s of one DALI loader; its pipeline (and DALI's thread pool) goes when this returns."""
    from .pipeline import Loader

    loader = Loader(cfg, train)
    return _iter_rate(lambda: _count(loader), bench.repeats, bench.epochs, sync)


def _decode_rate(bench: PipelineBench, cfg, train: bool, sync) -> float:
    """images/s of the same reader and decoder with nothing after them: the ceiling."""
    from .pipeline import batches_per_epoch, build_pipeline

    pipe, n_samples, _ = build_pipeline(cfg, train, decode_only=True)
    batches = batches_per_epoch(cfg, n_samples)

    def epoch():
        for _ in range(batches):
            pipe.run()
        return batches * cfg.batch_size
    return _iter_rate(epoch, bench.repeats, bench.epochs, sync)


def _stage_rates(bench: PipelineBench, cfg, train: bool) -> dict:
    """(a), (b) and (c) for one loader configuration."""
    import torch

    from .baseline import baseline_loader

    dev = torch.device(cfg.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rates = {"dali": _loader_rate(bench, cfg, train, sync), "decode_only": _decode_rate(bench, cfg, train, sync)}
    if train:
        rates["dali_same_order"] = _loader_rate(bench, dataclasses.replace(cfg, shard_shuffle=False), train, sync)
    gc.collect()  # DALI's thread pools go with their pipelines
    if bench.baseline:
        base = baseline_loader(cfg.shards, cfg.batch_size, workers=cfg.num_threads, train=train, tencrop=cfg.tencrop,
                               mean=cfg.mean)
        rates["baseline"] = _iter_rate(lambda: _count(base, dev), bench.repeats, bench.epochs, sync)
    return {"images_per_s": rates, "dali_over_baseline": rates["dali"] / rates["baseline"] if bench.baseline else None,
            "dali_over_decode_only": rates["dali"] / rates["decode_only"]}


def pipeline_rates(bench: PipelineBench) -> dict:
    """images/s for train and ten-crop eval: (a) DALI loader, (b) DataLoader + PIL baseline, (c) decode only."""
    from .pipeline import LoaderConfig

    threads = bench.num_threads or _cores()
    result = {**to_json(bench), "threads": threads}
    for name, train, split, tencrop in (("train", True, "train", False), ("tencrop_eval", False, "val", True)):
        cfg = LoaderConfig(shards=bench.shards, split=split, batch_size=bench.batch_size, device=bench.device,
                           num_threads=threads, dtype=bench.dtype, tencrop=tencrop)
        result[name] = _stage_rates(bench, cfg, train)
    return result


def _print_pipeline(bench: PipelineBench, result: dict) -> None:
    print(f"pipeline on {bench.shards}, {bench.device} ({bench.dtype}), batch {bench.batch_size}, "
          f"{result['threads']} threads/workers, median of {bench.repeats} x {bench.epochs} epochs after a warm-up")
    print(f"{'':<14}{'DALI':>10}{'same order':>11}{'baseline':>10}{'decode':>10}{'x base':>8}{'x decode':>9}"
          "   (images/s)")
    nan = float("nan")
    for name in ("train", "tencrop_eval"):
        r, base = result[name]["images_per_s"], result[name]["dali_over_baseline"]
        print(f"{name:<14}{r['dali']:>10.0f}{r.get('dali_same_order', nan):>11.0f}{r.get('baseline', nan):>10.0f}"
              f"{r['decode_only']:>10.0f}{base or nan:>8.2f}{result[name]['dali_over_decode_only']:>9.2f}")
    print(f"({result['environment']['PIL']}, GPU: {result['environment']['GPU']})")


# ---- train -----------------------------------------------------------------------------------------------

FEEDS = "synthetic, dataloader, dali (the loader's defaults), dali-cpu (CPU decoding), dali-hwX (nvJPEG with " \
        "hw_decoder_load X)"


def _dali_overrides(feed: str) -> dict:
    """Loader options of a DALI feed name (see FEEDS)."""
    if feed == "dali":
        return {}
    if feed == "dali-cpu":
        return {"decoder": "cpu"}
    if feed.startswith("dali-hw"):
        try:
            return {"decoder": "mixed", "hw_decoder_load": float(feed[len("dali-hw"):])}
        except ValueError:
            pass
    raise OptionError(f"option feeds: unknown feed {feed!r} (feeds: {FEEDS})")


@dataclass(kw_only=True)
class TrainBench:
    """images/s of one training step (model, loss, backward, optimizer, as alexnet-train runs it) fed by each
    of `feeds`: a batch held on the device (synthetic, the ceiling), the DALI train pipeline (with its
    decoding variants) and the DataLoader baseline (workers + PIL + the reference augmentation, what
    pytorch/examples' ImageNet script does). Also the achieved TFLOP/s beside a bf16 matrix product's."""

    shards: Path = option(Path("data/shards"), "directory written by alexnet-prep")
    batch_size: int = option(128, "images per step (the paper's 128)", minimum=1)
    steps: int = option(20, "steps per timed repeat", minimum=1)
    repeats: int = option(5, "timed repeats (median), after a warm-up", minimum=1)
    device: str = option("auto", "auto (the GPU if there is one), cpu, cuda")
    num_threads: int | None = option(None, "DALI threads (default: cores)", minimum=1, flag="--threads")
    baseline_workers: int | None = option(None, "DataLoader workers of the baseline feed (default: cores)",
                                          minimum=1)
    width: float = option(1.0, "channel multiplier of the model", minimum=1e-3)
    variant: str = option("paper", "paper or torchvision", choices=("paper", "torchvision"))
    precision: str = option("bf16", "bf16 autocast or fp32 on GPUs", choices=("bf16", "fp32"))
    compile: bool = option(True, "torch.compile the network (GPU; as alexnet-train)")
    cuda_graph: bool = option(True, "capture the step as a CUDA graph (GPU)")
    feeds: str = option("synthetic,dali,dataloader", f"comma-separated feeds to time: {FEEDS}")
    profile: bool = option(False, "also print the GPU kernels a synthetic step spends its time in")
    json: bool = option(False, "print one JSON object instead of a table")

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


def _dali_source(cfg):
    """Batches from a DALI train loader, epoch after epoch."""
    from .pipeline import Loader

    stream = itertools.chain.from_iterable(iter(Loader(cfg, True)) for _ in itertools.count())
    return lambda: next(stream)


def _dataloader_source(bench: TrainBench, tcfg, device, dtype):
    """Batches from the DataLoader baseline, moved to the device as pytorch/examples does (pinned, async)."""
    import torch

    from .baseline import baseline_loader

    loader = baseline_loader(tcfg.shards, bench.batch_size, workers=bench.baseline_workers or _cores(), train=True,
                             mean=tcfg.mean, lighting_sigma=tcfg.lighting_sigma, lighting_form=tcfg.lighting_form,
                             seed=tcfg.seed, pin_memory=device.type == "cuda", drop_last=True)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    stream = itertools.chain.from_iterable(loader for _ in itertools.count())

    def source():
        images, labels = next(stream)
        return (images.to(device, dtype, non_blocking=True, memory_format=layout),
                labels.to(device, non_blocking=True))
    return source


def train_rates(bench: TrainBench) -> dict:
    """Training images/s of the same model and step fed by each of bench.feeds, and ratios to synthetic."""
    import torch

    from .distributed import World, resolve_device
    from .model import AlexNet, AlexNetConfig, flops_per_image, place
    from .pipeline import Loader
    from .step import TrainStep
    from .train import TrainConfig, loader_config, optimizer_for

    dev = resolve_device(bench.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    world = World(0, 1, 0, dev)
    tcfg = TrainConfig(shards=bench.shards, out=Path(tempfile.gettempdir()), batch_size=bench.batch_size,
                       num_threads=bench.num_threads, precision=bench.precision)
    first = Loader(loader_config(tcfg, world, "train"), train=True)
    model_cfg = AlexNetConfig(len(first.classes), bench.variant, bench.width)
    net = place(AlexNet(model_cfg), dev)
    model = torch.compile(net) if bench.compile and dev.type == "cuda" else net
    graph = bench.cuda_graph and dev.type == "cuda"
    step = TrainStep(model, optimizer_for(tcfg, net), dev, bench.precision, graph=graph)
    held = [t.clone() for t in next(iter(first))]  # same dtype, layout and device as the pipeline's batches
    threads = first.pipe.num_threads
    del first

    def rate(source) -> float:
        def steps():
            for _ in range(bench.steps):
                step(*source())
            return bench.steps * bench.batch_size
        return _iter_rate(steps, bench.repeats, 1, sync)

    rates, kernels = {}, None
    for feed in bench.feeds.split(","):
        if feed == "synthetic":
            rates[feed] = rate(lambda: held)
            if bench.profile and dev.type == "cuda":
                kernels = kernel_table(lambda: [step(*held) for _ in range(bench.steps)], bench.steps)
        elif feed == "dataloader":
            rates[feed] = rate(_dataloader_source(bench, tcfg, dev, held[0].dtype))
        else:
            rates[feed] = rate(_dali_source(loader_config(dataclasses.replace(tcfg, **_dali_overrides(feed)), world,
                                                          "train")))
            gc.collect()  # free that feed's DALI pipeline and threads before the next one
    flops = flops_per_image(model_cfg)["train_flops"]
    result = {**to_json(bench), "device": str(dev), "threads": threads, "images_per_s": rates,
              "over_synthetic": {k: v / rates["synthetic"] for k, v in rates.items()},
              "train_flops_per_image": flops, "tflops": {k: v * flops / 1e12 for k, v in rates.items()},
              "matmul_bf16_tflops": matmul_tflops(dev) if dev.type == "cuda" else None}
    if "dali" in rates and "dataloader" in rates:
        result["dali_over_dataloader"] = rates["dali"] / rates["dataloader"]
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


def main(bench) -> int:
    """Run one stage's benchmark and print its table (or JSON)."""
    run, show = {PrepBench: (prep_rates, _print_prep), PipelineBench: (pipeline_rates, _print_pipeline),
                 TrainBench: (train_rates, _print_train)}[type(bench)]
    result = run(bench)
    if not _print_json_or(result, bench.json):
        show(bench, result)
    return 0
