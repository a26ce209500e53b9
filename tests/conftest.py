"""Shared fixtures: one small sample ImageNet (every layout, every quirk) and its prepped shards."""

from __future__ import annotations

import importlib.util
import os
import shutil
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
def loopback():
    """An S3 server on this machine (moto's, in a subprocess) behind a proxy that can add latency and go down."""
    from alexnet_pipeline.loopback import Loopback

    with Loopback() as s3:
        yield s3


class S3:
    """The loopback store as one test sees it: its own bucket, its environment set (for child processes too)."""

    def __init__(self, loopback, bucket: str):
        self.loopback, self.bucket = loopback, bucket

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def gets(self, *parts: str) -> int:
        return self.loopback.gets("/".join([self.bucket, *parts]))

    def fs(self):
        import fsspec

        return fsspec.filesystem("s3")


_buckets = iter(range(10**6))


@pytest.fixture
def s3(loopback, monkeypatch, tmp_path):
    """A fresh bucket on the loopback store, with AWS_ENDPOINT_URL and test credentials in the environment
    and the user's cache (XDG_CACHE_HOME) in this test's directory."""
    for k, v in loopback.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    loopback.proxy.latency, loopback.down = 0.0, False
    bucket = f"test-{next(_buckets)}"
    loopback.make_bucket(bucket)
    yield S3(loopback, bucket)
    loopback.down = False


def publish_to(loopback, local: Path, url: str) -> None:
    """Upload a prepared directory to the loopback store (the environment set only while it runs)."""
    from alexnet_pipeline.prep.publish import publish

    old = {k: os.environ.get(k) for k in loopback.env}
    os.environ.update(loopback.env)
    try:
        publish(local, url)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def trained(prepped, tmp_path_factory):
    """A run of two epochs of a quarter-width paper AlexNet on the prepped sample (RUN/ with its checkpoints)."""
    from alexnet_pipeline import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train.run(train.TrainConfig(shards=prepped, out=out, epochs=2, width=0.25, global_batch=8, num_threads=1,
                                final_tencrop=False, device="cpu", log_every=8))
    return out


def numbered(prepped: Path, out: Path, sizes: list[int]) -> Path:
    """A copy of the prepped shards whose train split has shards of `sizes` samples (the prepped images taken
    in turn) labelled 0, 1, ... in shard order: a batch's labels say which samples, and so which shards, a
    rank read."""
    import dataclasses

    from alexnet_pipeline import shards

    shutil.copytree(prepped, out)
    (out / ".verified.json").unlink(missing_ok=True)
    images = [s for p in shards.shard_paths(out, "train") for s in shards.iter_samples(p.read_bytes())]
    for p in (out / "train").iterdir():
        p.unlink()
    infos, at = [], 0
    for i, n in enumerate(sizes):
        samples = [dataclasses.replace(images[(at + j) % len(images)], key=f"s{at + j:06d}", label=at + j)
                   for j in range(n)]
        infos.append(shards.write_shard(out / "train" / f"train-{i:06d}.tar", samples))
        at += n
    manifest = shards.load_manifest(out)
    manifest.splits["train"] = shards.SplitInfo(at, infos)
    manifest.classes = [f"n9{i:07d}" for i in range(at)]
    shards.write_manifest(out, manifest)
    shards.write_timm_info(out, manifest)
    return out


def shard_of(label: int, sizes: list[int]) -> int:
    """The shard of a numbered sample."""
    import numpy as np

    return int(np.searchsorted(np.cumsum(sizes), label, side="right"))


@pytest.fixture(scope="session")
def labelled_by_shard(prepped, tmp_path_factory):
    """numbered() shards of unequal sizes 3, 5, 1, 4, 2, 6: (directory, sizes)."""
    sizes = [3, 5, 1, 4, 2, 6]
    return numbered(prepped, tmp_path_factory.mktemp("by_shard") / "s", sizes), sizes


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
    from alexnet_pipeline import prep
    from alexnet_pipeline.prep import workers

    env = {**os.environ, workers.HOLD: stage}
    proc = HeldPrep(PREP + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, **popen)
    deadline = time.monotonic() + 60
    while len(workers.held(out / prep.WORK)) < holders:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prep never held {holders} process(es) in its {stage} stage: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    return proc
