"""Shared fixtures: one small sample ImageNet (every layout, every quirk) and its prepped shards."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["skip_policy", "pytester"]


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


@pytest.fixture(scope="session")
def trained(prepped, tmp_path_factory):
    """A run of two epochs of a quarter-width paper AlexNet on the prepped sample (RUN/ with its checkpoints)."""
    from alexnet_pipeline import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, width=0.25, global_batch=8, num_threads=1,
                                final_tencrop=False, device="cpu", log_every=8))
    return out


def read_samples(shards_dir: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """{key: (label, jpeg bytes)} of a split, read back through the manifest."""
    from alexnet_pipeline import shards

    return {s.key: (s.label, s.jpeg) for path in shards.shard_paths(shards_dir, split)
            for s in shards.iter_samples(path.read_bytes())}


PREP = [sys.executable, "-m", "alexnet_pipeline", "prep"]


class HeldPrep(subprocess.Popen):
    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (its lock with it)."""
        super().kill()
        self.wait()


def held_prep(args: list[str], out: Path, stage: str, holders: int = 1, **popen) -> HeldPrep:
    """alexnet-prep started with the test hook (ALEXNET_PREP_HOLD=stage): returns once `holders` processes have
    finished their first unit (or shard) and wait to be killed. A run that never gets there fails the test."""
    from alexnet_pipeline import prep, workers

    env = {**os.environ, workers.HOLD: stage}
    proc = HeldPrep(PREP + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, **popen)
    deadline = time.monotonic() + 60
    while len(workers.held(out / prep.WORK)) < holders:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prep never held {holders} process(es) in its {stage} stage: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    return proc
