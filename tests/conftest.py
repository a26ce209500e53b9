"""Shared fixtures: one small sample ImageNet (every layout, every quirk) and its prepped shards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sample_maker = _load_tool("make_sample_imagenet")
CLASSES = 4


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """(root, truth): the sample tree and {split: {file name: label}}."""
    root = tmp_path_factory.mktemp("imagenet") / "sample"
    truth = sample_maker.make(root, classes=CLASSES, train_per_class=6, val_per_class=3, seed=1, workers=2)
    return root, truth


@pytest.fixture(scope="session")
def prepped(sample, tmp_path_factory):
    """Shards of the extracted layout, written with one worker and small shards."""
    from alexnet_pipeline.prep import PrepConfig, run

    out = tmp_path_factory.mktemp("shards") / "out"
    run(PrepConfig(sample[0] / "extracted", out, shard_size=5, workers=1, progress=False))
    return out


def read_samples(shards_dir: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """{key: (label, jpeg bytes)} of a split, read back through the manifest."""
    from alexnet_pipeline import shards

    return {s.key: (s.label, s.jpeg) for path in shards.shard_paths(shards_dir, split)
            for s in shards.iter_samples(path.read_bytes())}
