"""Each option declared once: one name, one default, everywhere a user meets it (every command's --help and
every loader's signature), and the recipe flag on the declaration."""

import argparse
import inspect
from pathlib import Path

import pytest

from alexnet_pipeline import cli, config, options, pipeline, train

COMMANDS = ["prep_main", "train_main", "eval_main", "bench_main", "predict_main", "export_main"]


def _parsers(main_name):
    """Every argparse parser a command builds (subcommands included), captured as it parses --help."""
    seen = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.append(self)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen.extend(action.choices.values())
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            getattr(cli, main_name)(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen


def _defaults() -> dict[str, dict]:
    """{flag: {where: default}} over every command's flags and every loader keyword."""
    out: dict[str, dict] = {}
    for main in COMMANDS:
        for parser in _parsers(main):
            for action in parser._actions:
                for flag in action.option_strings:
                    if flag.startswith("--") and flag not in ("--help", "--version", "--verify"):
                        # no default, whether required or left to the command to check: "unset"
                        default = "unset" if action.required or action.default is None else action.default
                        out.setdefault(flag.removeprefix("--no-").removeprefix("--"), {})[parser.prog] = default
    for loader in (pipeline.train_loader, pipeline.eval_loader):
        fields = {f.name: f for f in config.documented_fields(options.LoaderConfig)}
        for name, p in inspect.signature(loader).parameters.items():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                flag = config.flag_of(fields[name]).removeprefix("--")
                out.setdefault(flag, {})[loader.__name__] = "unset" if p.default is None else p.default
    return out


def test_no_option_has_two_defaults():
    defaults = _defaults()
    assert {"global-batch", "batch-size", "device", "threads", "shards", "json", "checkpoint"} <= set(defaults)
    clashes = {flag: where for flag, where in defaults.items()
               if len({repr(Path(v) if isinstance(v, str) and "/" in v else v) for v in where.values()}) > 1}
    assert not clashes, clashes


def test_the_walker_sees_a_clash(monkeypatch):
    """The test above can fail: a second default for the per-rank batch is found."""
    changed = inspect.signature(pipeline.train_loader).replace(parameters=[
        p.replace(default=64) if p.name == "batch_size" else p
        for p in inspect.signature(pipeline.train_loader).parameters.values()])
    monkeypatch.setattr(pipeline.train_loader, "__signature__", changed)
    assert len(set(_defaults()["batch-size"].values())) == 2


def test_the_global_and_the_per_rank_batch_have_different_names():
    train_flags = {a.dest for p in _parsers("train_main") for a in p._actions}
    eval_flags = {a.dest for p in _parsers("eval_main") for a in p._actions}
    assert "global_batch" in train_flags and "batch_size" not in train_flags
    assert "batch_size" in eval_flags and "global_batch" not in eval_flags


def test_the_recipe_is_what_the_declarations_flag():
    recipe = set(train.RECIPE)
    assert {"global_batch", "lr", "momentum_rule", "mean", "lighting_form", "seed", "width", "precision",
            "draws"} <= recipe
    assert not {"epochs", "log_every", "num_threads", "device", "batches_per_run", "prefetch", "resume",
                "hw_decoder_load"} & recipe


def test_eval_takes_the_decoding_options():
    eval_flags = {a.dest for p in _parsers("eval_main") for a in p._actions}
    assert {"decoder", "hw_decoder_load", "prefetch", "num_threads", "batches_per_run"} <= eval_flags


@pytest.mark.parametrize("rank", [2, 3])
def test_a_rank_outside_the_world_is_refused_naming_it(rank, tmp_path):
    with pytest.raises(config.OptionError, match=rf"option rank: {rank} is not in \[0, world_size=2\)"):
        options.LoaderConfig(shards=tmp_path, split="train", rank=rank, world_size=2, device="cpu")
    assert options.LoaderConfig(shards=tmp_path, split="train", rank=1, world_size=2, device="cpu").rank == 1


def test_a_ranks_threads_are_its_machines_cores_over_the_ranks_on_that_machine(monkeypatch):
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("WORLD_SIZE", "8")  # two machines of four ranks: only this machine's ranks share its cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert options.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert options.default_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert options.default_threads() == 16


@pytest.mark.parametrize("device", ["cpux", "cuda:1x", "autox", "gpu"])
def test_a_device_that_is_not_one_is_refused_naming_it(device, tmp_path):
    with pytest.raises(config.OptionError, match="option device: must be auto, cpu, cuda or cuda:N"):
        options.LoaderConfig(shards=tmp_path, split="train", device=device)
    assert options.LoaderConfig(shards=tmp_path, split="train", device="cpu").device == "cpu"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_output_is_refused_on_the_cpu(dtype, tmp_path):
    with pytest.raises(config.OptionError, match="option dtype: float16/bfloat16 output is for GPUs"):
        options.LoaderConfig(shards=tmp_path, split="train", dtype=dtype, device="cpu")


def test_a_shuffle_window_of_zero_is_the_global_permutation_and_below_zero_is_refused(tmp_path):
    assert options.LoaderConfig(shards=tmp_path, split="train", shuffle_window=0, device="cpu").shuffle_window == 0
    with pytest.raises(config.OptionError, match="option shuffle_window"):
        options.LoaderConfig(shards=tmp_path, split="train", shuffle_window=-1, device="cpu")


def test_a_cache_size_that_is_not_a_size_is_refused_naming_the_option(tmp_path):
    with pytest.raises(config.OptionError, match="option cache_size"):
        options.LoaderConfig(shards="s3://bucket/data", split="train", cache_size="lots", device="cpu")
    assert options.LoaderConfig(shards="s3://bucket/data", split="train", cache_size="2G", device="cpu").cache_bytes \
        == 2 * 2**30


def test_auto_is_this_ranks_gpu_where_torch_sees_one_and_the_cpu_where_it_sees_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert options.resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(config.OptionError, match="torch sees no GPU"):
        options.resolve_device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert options.resolve_device("auto", 3) == torch.device("cuda", 3)
    assert options.resolve_device("cuda", 2) == torch.device("cuda", 2)


def test_a_dali_run_holds_batches_per_run_batches(tmp_path):
    cfg = options.LoaderConfig(shards=tmp_path, split="train", batch_size=6, batches_per_run=4)
    assert cfg.run_size == 24 and cfg.runs_for(2) is cfg  # given: kept, even beyond the epoch's batches


@pytest.mark.parametrize("batch_size,tencrop,steps,per_run", [
    (64, False, 100, 4), (100, False, 100, 3), (256, False, 100, 1), (512, False, 100, 1),  # >= 256 images
    (32, False, 5, 5),  # no more than the epoch's batches (the rest would be padding, decoded for nothing)
    (16, True, 100, 2),  # ten-crop views count: 160 views a batch
    (8, False, 0, 1)])
def test_a_cpu_loaders_runs_hold_at_least_256_images_by_default(tmp_path, batch_size, tencrop, steps, per_run):
    cfg = options.LoaderConfig(shards=tmp_path, split="val", batch_size=batch_size, tencrop=tencrop, device="cpu")
    assert cfg.batches_per_run is None and options.CPU_RUN_IMAGES == 256
    assert cfg.runs_for(steps).per_run == per_run


def test_a_gpu_loader_makes_one_batch_a_run_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(options, "resolve_device", lambda name: name)  # as if torch saw a GPU (none here)
    cfg = options.LoaderConfig(shards=tmp_path, split="train", batch_size=8, device="cuda:0")
    assert cfg.runs_for(100).per_run == 1
