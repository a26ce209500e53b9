"""The DALI pipelines on the CPU backend, against the numpy reference (alexnet_pipeline.augment)."""

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_pipeline import augment, shards
from alexnet_pipeline.pipeline import (
    PAD_LABEL,
    Loader,
    LoaderConfig,
    ShardError,
    eval_loader,
    exposed_names,
    train_loader,
)


def _stats(prepped):
    with np.load(prepped / "stats.npz") as z:
        return {k: z[k] for k in z.files}


def _run(prepped, train, batches=1, **options):
    """Run the exposed pipeline: list of per-sample dicts with output, label, decoded image and draws."""
    options.setdefault("batches_per_run", 1)  # a run per batch
    cfg = LoaderConfig(shards=prepped, split="train" if train else "val", batch_size=options.pop("batch_size", 8),
                       num_threads=2, **options)
    pipe = Loader(cfg, train).graph(expose=True)
    names = exposed_names(cfg, train)
    samples = []
    for _ in range(batches):
        outs = pipe.run()
        for i in range(len(outs[0])):
            sample = {n: np.array(o[i]) for n, o in zip(names, outs, strict=True)}
            if "alpha" in sample:  # the host draws give the three alphas as one vector
                sample.update({f"alpha{j}": sample["alpha"][j] for j in range(3)})
            samples.append(sample)
    return samples


@pytest.mark.parametrize("mean_mode,form,draws", [("channel", "sqrt", "host"), ("pixel", "eigval", "host"),
                                                  ("channel", "eigval", "dali"), ("pixel", "sqrt", "dali")])
def test_train_output_equals_the_reference_for_the_same_draws(prepped, mean_mode, form, draws):
    stats = _stats(prepped)
    mean = augment.mean_to_subtract(stats, mean_mode)
    for s in _run(prepped, True, batches=2, mean=mean_mode, lighting_form=form, lighting_sigma=0.5, draws=draws):
        x, y = int(round(float(s["x"]) * 32)), int(round(float(s["y"]) * 32))
        alpha = np.array([float(s[f"alpha{j}"]) for j in range(3)])
        shift = augment.lighting_shift(alpha, stats["eigval"], stats["eigvec"], form)
        ref = augment.augment(s["image"], x, y, bool(s["mirror"]), mean, shift)
        np.testing.assert_allclose(s["out"], ref, atol=2e-3)


def test_dali_decoding_matches_pil_within_jpeg_decoder_tolerance(prepped):
    s = _run(prepped, False)[0]
    key_bytes = next(iter(shards.iter_tar(shards.shard_paths(prepped, "val")[0].read_bytes())))[1]
    pil = np.asarray(Image.open(io.BytesIO(key_bytes)).convert("RGB"), np.float64)
    assert np.abs(pil - s["image"]).max() <= 8 and np.abs(pil - s["image"]).mean() < 1.0


def test_center_crop_is_at_offset_16_with_the_mean_image_by_default(prepped):
    mean = augment.mean_to_subtract(_stats(prepped), "pixel")
    for s in _run(prepped, False):
        np.testing.assert_allclose(s["out"], augment.augment(s["image"], 16, 16, False, mean), atol=1e-3)


def test_ten_crops_are_the_ten_views_in_documented_order(prepped):
    mean = augment.mean_to_subtract(_stats(prepped), "pixel")
    for s in _run(prepped, False, tencrop=True, mean="pixel"):
        assert s["out"].shape == (10, 3, 224, 224)
        np.testing.assert_allclose(s["out"], augment.ten_crop(s["image"], mean), atol=1e-3)


@pytest.mark.parametrize("draws", ["host", "dali"])
def test_draws_over_many_samples(prepped, draws):
    stats = _stats(prepped)
    samples = _run(prepped, True, batches=50, batch_size=32, lighting_sigma=0.1, lighting_form="sqrt", mean="channel",
                   draws=draws)
    xs = np.array([round(float(s["x"]) * 32) for s in samples])
    ys = np.array([round(float(s["y"]) * 32) for s in samples])
    for v in (xs, ys):
        counts = np.bincount(v, minlength=33)
        assert len(counts) == 33 and counts.min() > 0  # every offset 0..32 occurs
        expected = len(v) / 33  # chi-square against uniform, 32 dof: 99.9% quantile is about 62.5
        assert ((counts - expected) ** 2 / expected).sum() < 62.5
    flips = np.mean([bool(s["mirror"]) for s in samples])
    assert abs(flips - 0.5) < 4 * 0.5 / np.sqrt(len(samples))
    # the shift actually applied, read back from the output: out - (crop - mean)
    mean = augment.mean_to_subtract(stats, "channel")
    shifts = np.array([(s["out"] - augment.augment(s["image"], round(float(s["x"]) * 32), round(float(s["y"]) * 32),
                                                   bool(s["mirror"]), mean)).mean(axis=(1, 2)) for s in samples])
    scale = augment.lighting_scale(stats["eigval"], "sqrt")
    expected_cov = stats["eigvec"] @ np.diag((0.1 * scale) ** 2) @ stats["eigvec"].T
    np.testing.assert_allclose(np.cov(shifts.T), expected_cov, atol=0.15 * expected_cov.max())


def _fingerprints(loader):
    out = []
    for images, labels in loader:
        for img, lab in zip(images, labels, strict=True):
            if lab != PAD_LABEL:
                out.append((int(lab), round(float(img.double().sum()), 1)))
    return sorted(out)


def test_eval_over_1_2_3_ranks_counts_every_image_once(prepped):
    whole = _fingerprints(eval_loader(prepped, batch_size=4, num_threads=1))
    assert len(whole) == shards.load_manifest(prepped).splits["val"].samples
    assert len(set(whole)) == len(whole)
    for world in (2, 3):
        loaders = [eval_loader(prepped, batch_size=4, rank=r, world_size=world, num_threads=1) for r in range(world)]
        assert len({len(lo) for lo in loaders}) == 1  # same number of batches on every rank
        for epoch in range(2):  # shards rotate between epochs; still exactly once
            parts = [_fingerprints(lo) for lo in loaders]
            assert sorted(sum(parts, [])) == whole, (world, epoch)


def test_two_train_ranks_see_disjoint_samples_whose_union_is_the_epoch(prepped):
    def keys(rank, world):
        seen = []
        for s in _run(prepped, True, batches=len(train_loader(prepped, batch_size=8, world_size=world,
                                                                rank=rank, num_threads=1)),
                      batch_size=8, world_size=world, rank=rank, lighting_sigma=0):
            if s["label"].item() != PAD_LABEL:
                seen.append(hash(s["image"].tobytes()))
        return seen

    n = shards.load_manifest(prepped).splits["train"].samples
    a, b = keys(0, 2), keys(1, 2)
    a_set, b_set = set(a), set(b)
    assert not a_set & b_set and len(a) + len(b) == n
    assert len(a_set | b_set) == n


def test_loader_outputs_shapes_dtypes_and_layouts(prepped):
    images, labels = next(iter(train_loader(prepped, batch_size=4, num_threads=1)))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32 and labels.dtype == torch.int64
    images, _ = next(iter(train_loader(prepped, batch_size=4, num_threads=1, channels_last=True)))
    assert images.shape == (4, 3, 224, 224) and images.is_contiguous(memory_format=torch.channels_last)
    images, _ = next(iter(eval_loader(prepped, batch_size=2, num_threads=1, tencrop=True)))
    assert images.shape == (2, 10, 3, 224, 224)


@pytest.mark.parametrize("seed,batch_size", [(0, 16), (1, 5), (2, 7)])
def test_unmasked_labels_of_each_shuffled_epoch_are_the_dataset_labels(prepped, seed, batch_size):
    """With shuffling, DALI's padding repeats must still land where the loader masks them (the tail)."""
    from conftest import read_samples

    want = sorted(v[0] for v in read_samples(prepped, "train").values())
    loader = train_loader(prepped, batch_size=batch_size, seed=seed, num_threads=1)
    for _ in range(2):
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == len(loader) * batch_size
        assert sorted(labels[labels != PAD_LABEL].tolist()) == want


@pytest.mark.parametrize("damage", ["truncate", "no_index", "empty_dir", "bad_option", "gpu_without_gpu"])
def test_bad_shards_fail_fast_naming_the_file(prepped, tmp_path, damage):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    tar = shards.shard_paths(copy, "train")[0]
    options = {}
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:5000])
    elif damage == "no_index":
        tar.with_suffix(".idx").unlink()
    elif damage == "empty_dir":
        shutil.rmtree(copy)
        copy.mkdir()
    elif damage == "bad_option":
        options = {"mean": "median"}
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        options = {"device": "cuda"}
    t0 = time.time()
    with pytest.raises((ShardError, ValueError)) as e:
        next(iter(train_loader(copy, batch_size=4, num_threads=1, **options)))
    assert time.time() - t0 < 10
    name = {"truncate": tar.name, "no_index": tar.with_suffix(".idx").name, "empty_dir": "dataset.json",
            "bad_option": "median", "gpu_without_gpu": "no GPU"}[damage]
    assert name in str(e.value)


def test_cpu_batches_stay_valid_while_later_batches_are_produced(prepped):
    """The CPU loader hands out DALI's buffers without copying; that is only sound if DALI never recycles
    them while torch holds them (DALI's dynamic executor). If this fails, the loader must copy."""
    loader = train_loader(prepped, batch_size=8, num_threads=2)
    held = [(images, images.clone()) for images, _ in loader]
    for _ in loader:  # another epoch of runs that would reuse recycled buffers
        pass
    assert len({a.data_ptr() for a, _ in held}) == len(held)
    assert all(torch.equal(a, b) for a, b in held)


@pytest.mark.parametrize("per_run,taken", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_an_abandoned_epoch_does_not_shift_the_next_epochs(prepped, per_run, taken):
    """Abandoned after `taken` batches, inside a run of several batches or at its end: the rest of the epoch's
    runs are made and dropped, no more and no fewer."""
    options = dict(batch_size=2, num_threads=1, batches_per_run=per_run, rank=0, world_size=2)

    def ordered(loader):  # in order, not sorted: a stream shifted by a run would keep the same multiset
        return [(tuple(y.tolist()), round(float(x.double().sum()), 1)) for x, y in loader]

    reference = eval_loader(prepped, **options)
    ordered(reference)
    whole = ordered(reference)  # the second epoch of an undisturbed loader (rank 0 of 2: its part rotates)
    loader = eval_loader(prepped, **options)
    assert len(loader) > taken
    for i, _ in enumerate(loader):
        if i + 1 == taken:
            break  # abandon the first epoch
    assert ordered(loader) == whole
    assert loader.epoch == 2


def test_an_epoch_left_right_after_its_last_batch_is_over_and_nothing_of_the_next_is_dropped(prepped):
    """A loop that stops on an epoch's last batch (a signal there) has finished that epoch: the runs DALI made
    ahead belong to the next one and are kept. Dropped and made again, they would draw DALI's random crops
    anew, and the next epoch would not be the undisturbed loader's."""
    options = dict(batch_size=4, num_threads=1, draws="dali", lighting_sigma=0)

    def exact(loader):
        return [(y.tolist(), x.numpy().tobytes()) for x, y in loader]

    reference = train_loader(prepped, **options)
    exact(reference)
    whole = exact(reference)
    loader = train_loader(prepped, **options)
    for i, _ in enumerate(loader):
        if i + 1 == len(loader):
            break  # the last batch taken; the loop never asks for the epoch's end
    assert loader.position == len(loader)
    assert exact(loader) == whole and loader.epoch == 2


def _epoch_labels(shards_dir, epochs, **options):
    """Per epoch, the labels in the order the train loader yields them (padding left out)."""
    loader = train_loader(shards_dir, batch_size=4, num_threads=1, lighting_sigma=0, **options)
    out = []
    for _ in range(epochs):
        labels = torch.cat([y for _, y in loader])
        out.append(labels[labels != PAD_LABEL].tolist())
    return out


def test_every_epoch_a_new_order_whose_samples_stay_within_windows_of_shards(labelled_by_shard):
    """Labels number the samples in shard order here: an epoch is every sample once, in a new order every epoch,
    and a stream reads its shards' samples a window at a time; without the shuffle, one sequence every epoch."""
    out, sizes = labelled_by_shard
    first, second = _epoch_labels(out, 2, shuffle_window=2, streams=1)
    assert sorted(first) == sorted(second) == list(range(sum(sizes)))
    assert first != second
    shards_seen = [_shard_of(v, sizes) for v in first]
    windows = [sorted(set(shards_seen[k:k + 2])) for k in range(0, len(shards_seen))]
    # with one stream and windows of 2 shards, a shard's samples all come before the window after its own
    changes = [k for k in range(1, len(shards_seen)) if shards_seen[k] not in shards_seen[:k]]
    assert len(changes) == len(sizes) - 1 and all(len(w) <= 3 for w in windows)
    same = _epoch_labels(out, 2, shard_shuffle=False, streams=1)
    assert same[0] == same[1] == list(range(sum(sizes)))  # the prepared order, every epoch


def test_a_resumed_loader_continues_exactly_into_the_next_epochs_new_order(prepped):
    def fingerprints(batches):
        return [(tuple(y.tolist()), round(float(x.double().sum()), 3)) for x, y in batches]

    options = dict(batch_size=4, num_threads=1, shuffle_window=2)
    whole = train_loader(prepped, **options)
    run = [b for _ in range(3) for b in whole]
    cut = train_loader(prepped, **options)
    taken = []
    for b in cut:  # epoch 1, then stop part-way through epoch 2
        taken.append(b)
    it = iter(cut)
    taken += [next(it), next(it)]
    resumed = Loader(cut.cfg, True, cut.state_dict())
    rest = [b for _ in range(2) for b in resumed][:len(run) - len(taken)]
    assert fingerprints(taken + rest) == fingerprints(run)


def test_loader_options_are_visible_and_checked():
    import inspect

    params = inspect.signature(train_loader).parameters
    assert params["batch_size"].kind is inspect.Parameter.KEYWORD_ONLY and params["batch_size"].default == 128
    assert "tencrop" not in params and "tencrop" in inspect.signature(eval_loader).parameters
    assert "shard_shuffle" in params and "lighting_sigma" not in inspect.signature(eval_loader).parameters
    assert "hw_decoder_load" in train_loader.__doc__ and "mean image" in eval_loader.__doc__


@pytest.mark.parametrize("loader,options,message", [
    ("train", {"tencrop": True}, "'tencrop' is an eval_loader option"),
    ("eval", {"lighting_sigma": 0.2}, "'lighting_sigma' is a train_loader option"),
    ("train", {"batch_sise": 8}, "'batch_sise' is not an option"),
    ("train", {"batch_size": "8"}, "option batch_size: expected int"),
    ("train", {"batch_size": 0}, "option batch_size: must be at least 1"),
    ("eval", {"hw_decoder_load": 2.0}, "option hw_decoder_load: must be at most 1"),
    ("train", {"decoder": "mixed"}, "option decoder: mixed (nvJPEG) decoding needs a GPU device"),
    ("train", {"device": "gpu"}, "option device: must be auto, cpu, cuda or cuda:N; got 'gpu'")])
def test_bad_loader_options_are_refused_naming_the_option(prepped, loader, options, message):
    from alexnet_pipeline.config import OptionError

    with pytest.raises(OptionError) as e:
        (train_loader if loader == "train" else eval_loader)(prepped, **options)
    assert message in str(e.value)


def _exact(batches):
    """Every batch as (labels, the images' bytes): equal means the same tensors, bit for bit."""
    return [(tuple(y.tolist()), x.numpy().tobytes()) for x, y in batches]


@pytest.mark.parametrize("batch_size,per_run", [(4, 3), (5, 2), (8, 4)])
def test_a_sliced_dali_run_gives_the_plain_loaders_batches_in_order(prepped, batch_size, per_run):
    options = dict(batch_size=batch_size, num_threads=1, shuffle_window=2)
    plain, sliced = train_loader(prepped, batches_per_run=1, **options), train_loader(prepped, batches_per_run=per_run,
                                                                                     **options)
    assert len(plain) == len(sliced) and sliced.runs < plain.runs
    for _ in range(3):  # several epochs: the shard order changes, the padding stays at each epoch's end
        a, b = _exact(plain), _exact(sliced)
        assert a == b
        labels = [label for batch, _ in a for label in batch]
        assert labels.count(PAD_LABEL) == len(plain) * batch_size - plain.n_samples


def test_with_dali_draws_a_sliced_run_keeps_the_samples_and_their_order(prepped):
    """DALI's own random operators draw per position in a run, so the crops differ; the samples do not."""
    options = dict(batch_size=4, num_threads=1, draws="dali", shuffle_window=2, lighting_sigma=0)

    def images(per_run):
        cfg = LoaderConfig(shards=prepped, split="train", batches_per_run=per_run, **options)
        loader = Loader(cfg, True)
        pipe, n = loader.graph(expose=True), loader.n_samples
        out = []
        for _ in range(-(-n // cfg.run_size)):
            decoded = pipe.run()[2]
            out += [hash(np.array(decoded[i]).tobytes()) for i in range(len(decoded))]
        return out[:n]

    assert images(1) == images(3)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 6])
def test_a_resume_inside_or_at_the_end_of_a_run_of_batches_is_exact(prepped, stop_after):
    options = dict(batch_size=4, num_threads=1, shuffle_window=2, batches_per_run=3)
    whole = train_loader(prepped, **options)
    run = [b for _ in range(2) for b in whole]
    cut = train_loader(prepped, **options)
    it = iter(cut)
    taken = [next(it) for _ in range(stop_after)]  # 3 per run: inside a run, at its end, in the second
    resumed = Loader(cut.cfg, True, cut.state_dict())
    again = Loader(cut.cfg, True, resumed.state_dict())  # saved again before it made a batch: the same place
    rest = [b for _ in range(2) for b in resumed]  # the rest of the epoch, then the next: nothing cut off here
    assert len(taken) + len(rest) == len(run) and _exact(taken + rest) == _exact(run)
    assert _exact([b for _ in range(2) for b in again]) == _exact(rest)


def test_dali_draws_resume_on_another_number_of_ranks_with_the_same_global_batch(labelled_by_shard):
    """A state saved by one rank with DALI's draws, resumed by two with half the batch each: the global batch
    is the same, so the epoch goes on at the same sample; DALI's state is of one rank's draws and is left (the
    two ranks draw afresh) rather than fed to a pipeline of another batch size."""
    out, _ = labelled_by_shard
    options = dict(shards=out, split="train", num_threads=1, draws="dali", shuffle_window=2, lighting_sigma=0)
    whole = [y.tolist() for _, y in Loader(LoaderConfig(batch_size=4, **options), True)]
    cut = Loader(LoaderConfig(batch_size=4, **options), True)
    it = iter(cut)
    next(it), next(it)
    state = cut.state_dict()
    assert state["world_size"] == 1 and "dali" in state
    ranks = [Loader(LoaderConfig(batch_size=2, rank=r, world_size=2, **options), True, state) for r in range(2)]
    assert [r._restore(state)[2] for r in ranks] == [None, None]
    assert Loader(cut.cfg, True, state)._restore(state)[2] == state["dali"].numpy().tobytes()  # same ranks: kept
    rest = [[a[0], b[0], a[1], b[1]] for (_, a), (_, b) in zip(*ranks, strict=True)]  # rank r: positions r, r+2
    assert [[int(v) for v in batch] for batch in rest] == whole[2:]


def test_one_loader_serves_every_epoch_with_one_pipeline(prepped, monkeypatch):
    from alexnet_pipeline import pipeline

    builds, real = [], pipeline.build_pipeline
    monkeypatch.setattr(pipeline, "build_pipeline", lambda *a, **k: builds.append(1) or real(*a, **k))
    loader = train_loader(prepped, batch_size=4, num_threads=1)
    stream = loader.endless()
    batches = [next(stream) for _ in range(3 * len(loader) + 1)]
    assert len(builds) == 1 and loader.epoch == 3 and len(batches) == 3 * len(loader) + 1


def test_each_of_two_ranks_on_one_machine_gets_half_the_cores(prepped, tmp_path):
    """Under torchrun, a rank's DALI pipelines (train and eval) and torch's threads take the cores divided by
    LOCAL_WORLD_SIZE, not every core each."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import os, sys, torch\n"
        "from alexnet_pipeline import train_loader, eval_loader\n"
        "from alexnet_pipeline.distributed import setup\n"
        "world = setup('cpu', 'gloo')\n"
        f"t = train_loader({str(prepped)!r}, batch_size=4, device='cpu', rank=world.rank, world_size=world.size)\n"
        f"e = eval_loader({str(prepped)!r}, batch_size=4, device='cpu', rank=world.rank, world_size=world.size)\n"
        f"open(f'{tmp_path}/threads{{world.rank}}.txt', 'w').write("  # a file each: the ranks' prints can interleave
        "f'{world.rank} {t.pipe.num_threads} {e.pipe.num_threads} {torch.get_num_threads()}')\n"
        "world.close()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    rows = [(tmp_path / f"threads{rank}.txt").read_text().split() for rank in (0, 1)]
    assert rows == [[str(rank), *[str(half)] * 3] for rank in (0, 1)], rows
    alone = train_loader(prepped, batch_size=4, device="cpu")
    assert alone.pipe.num_threads == len(os.sched_getaffinity(0))  # one process: every core


# ---- ranks, epochs and the shards each rank reads ------------------------------------------------------

from conftest import shard_of as _shard_of  # noqa: E402


@pytest.mark.parametrize("world,shuffled,streams", [(2, True, 4), (3, True, 3), (2, False, 2), (3, True, 16)])
def test_every_epoch_each_sample_counts_once_over_the_ranks_and_each_rank_reads_its_scheduled_shards(
        labelled_by_shard, world, shuffled, streams):
    """Every epoch each sample is yielded once over the ranks (padding marked), and each rank reads exactly the
    shards its schedule (order.Split.uses) names: what its digest hashes and its node cache fetches."""
    from collections import Counter

    out, sizes = labelled_by_shard
    loaders = [train_loader(out, batch_size=2, rank=r, world_size=world, shard_shuffle=shuffled, num_threads=1,
                            lighting_sigma=0, streams=streams, shuffle_window=2) for r in range(world)]
    for epoch in range(3):
        counted = Counter()
        for loader in loaders:
            labels = torch.cat([y for _, y in loader])
            real = labels[labels != PAD_LABEL].tolist()
            counted.update(real)
            read = {_shard_of(v, sizes) for v in real}
            scheduled = set(loader.split.uses(epoch))
            padding = _shard_of(int(loader.split.order.of_epoch(epoch)[-1]), sizes)  # the epoch's last sample
            assert read <= scheduled and scheduled - read <= {padding}, (epoch, loader.cfg.rank)
        assert counted == dict.fromkeys(range(sum(sizes)), 1), epoch  # every sample once, no padding counted


def test_ranks_that_divide_the_streams_read_disjoint_shards(labelled_by_shard):
    """Two streams over two ranks: each rank reads one stream of its own (every other position of the epoch's
    order), so the ranks' shards are disjoint but for the one split at the streams' edge (and the padding's),
    as a node cache wants."""
    out, sizes = labelled_by_shard
    loaders = [train_loader(out, batch_size=2, rank=r, world_size=2, num_threads=1, streams=2, shuffle_window=1)
               for r in range(2)]
    for epoch in range(2):
        order = loaders[0].split.order.of_epoch(epoch)
        streams = [{_shard_of(int(v), sizes) for v in order[r::2]} for r in range(2)]
        padding = {_shard_of(int(order[-1]), sizes)}
        assert len(streams[0] & streams[1]) <= 1 and streams[0] | streams[1] == set(range(len(sizes)))
        for r, lo in enumerate(loaders):
            assert set(lo.split.uses(epoch)) == streams[r] | padding, (epoch, r)


def _join_digests():
    """Wait for the digests of earlier tests' loaders, which would otherwise hash under a test's patch."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "shard-digest":
            thread.join()


def test_the_background_digest_hashes_this_ranks_shards_in_the_order_it_reads_them(labelled_by_shard, monkeypatch):
    import threading

    out, sizes = labelled_by_shard
    _join_digests()
    hashed, real = [], shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: (hashed.append(Path(p).name)
                                                          if threading.current_thread().name == "shard-digest"
                                                          else None) or real(p))
    loader = train_loader(out, batch_size=2, rank=1, world_size=2, num_threads=1, streams=2,
                          shuffle_window=1).wait_for_digest()
    want = list(loader.split.uses(0))
    assert hashed == [f"train-{i:06d}.tar" for i in want] and len(want) < len(sizes)


def test_a_dali_failure_hashes_only_the_shards_of_the_runs_in_flight_to_name_the_damaged_one(
        labelled_by_shard, tmp_path, monkeypatch):
    """A shard damaged with its size and time kept, after the digest found it intact (as if it rotted
    mid-run): DALI fails decoding it, and the loader hashes only the shards of the runs DALI had in flight,
    names the damaged one and never reads the others. With no time to search, DALI's own error stands."""
    from alexnet_pipeline import pipeline

    out, sizes = labelled_by_shard
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    options = dict(batch_size=2, num_threads=1, lighting_sigma=0, streams=1, shuffle_window=1, shard_shuffle=False)
    shard = shards.shard_paths(copy, "train")[4]  # read in the second half of the epoch

    def damaged_loader():
        loader = train_loader(copy, **options).wait_for_digest()
        loader._digest.intact.discard(4)  # as if it rotted after the digest passed it
        data, kept = bytearray(shard.read_bytes()), shard.stat()
        start = data.index(b"\xff\xd8\xff")
        data[start:start + 3] = b"\0\0\0"  # no decoder reads past a missing start-of-image marker
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(kept.st_atime_ns, kept.st_mtime_ns))
        return loader

    loader = damaged_loader()
    hashed, real = [], shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    with pytest.raises(ShardError, match=f"{shard}: its bytes differ"):
        list(loader)
    assert shard.name in hashed and set(hashed) <= {f"train-{i:06d}.tar" for i in (3, 4, 5)}, hashed
    shutil.copytree(out, copy, dirs_exist_ok=True)
    monkeypatch.setattr(pipeline, "DAMAGE_SEARCH_SECONDS", 0)
    again = damaged_loader()
    hashed.clear()
    with pytest.raises(RuntimeError) as e:
        list(again)
    assert not isinstance(e.value, ShardError) and hashed == []


def test_a_state_saved_at_an_epochs_last_batch_resumes_at_the_next_epochs_first_batch(prepped):
    def fingerprint(batch):
        return tuple(batch[1].tolist()), round(float(batch[0].double().sum()), 3)

    options = dict(batch_size=4, num_threads=1, shuffle_window=2)
    whole = train_loader(prepped, **options)
    list(whole)
    second_epoch_first = fingerprint(next(iter(whole)))
    cut = train_loader(prepped, **options)
    for taken, _ in enumerate(cut, 1):  # the state taken at the epoch's last batch, before the loop ends
        if taken == len(cut):
            state = cut.state_dict()
            break
    assert (int(state["epoch"]), int(state["step"])) == (1, 0)
    resumed = Loader(cut.cfg, True, state)
    assert fingerprint(next(iter(resumed))) == second_epoch_first


def test_an_index_consistent_with_itself_but_short_of_the_manifests_count_is_refused(prepped, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    idx = shards.shard_paths(copy, "train")[0].with_suffix(".idx")
    lines = idx.read_text().splitlines()
    idx.write_text(f"v1.2 {len(lines) - 2}\n" + "".join(line + "\n" for line in lines[1:-1]))  # one sample fewer
    assert shards.index_extent(idx)[0] == len(lines) - 2  # readable as an index
    with pytest.raises(ShardError, match=f"{idx}: does not describe"):
        train_loader(copy, batch_size=4, num_threads=1)


def test_the_digest_of_a_stores_cached_copies_passes_intact_ones_and_keeps_them(prepped, tmp_path):
    """Shards from a store (file:// here) read through the node cache: a later loader trusts the copies it
    finds, and its background digest hashes them; finding them the manifest's bytes, it reports nothing and
    removes nothing."""
    options = dict(batch_size=4, num_threads=1, shuffle_window=1)
    fetched = train_loader(f"file://{prepped}", cache_dir=tmp_path / "cache", **options)
    assert _exact(fetched) == _exact(train_loader(prepped, **options))
    fetched.close()
    trusted = train_loader(f"file://{prepped}", cache_dir=tmp_path / "cache", **options)
    assert trusted.cache.downloads == 0 and trusted.cache.trusted
    trusted.wait_for_digest()
    assert len(list((tmp_path / "cache").rglob("*.tar"))) == len(shards.shard_paths(prepped, "train"))


def test_a_background_digest_slower_than_an_epoch_still_stops_that_epochs_end(prepped, tmp_path, monkeypatch):
    import threading

    copy = tmp_path / "s"
    shutil.copytree(prepped, copy)
    shard = shards.shard_paths(copy, "train")[0]
    data, kept = bytearray(shard.read_bytes()), shard.stat()
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    _join_digests()
    real, digest_started = shards.file_sha256, threading.Event()

    def slow(path):
        if threading.current_thread().name == "shard-digest":
            digest_started.set()
            time.sleep(1.0)  # longer than the whole epoch below takes
        return real(path)
    monkeypatch.setattr(shards, "file_sha256", slow)
    loader = train_loader(copy, batch_size=8, num_threads=1)
    batches = 0
    with pytest.raises(ShardError, match=f"{shard}: its bytes differ"):
        for _ in loader:
            batches += 1
    assert digest_started.is_set() and batches == len(loader) and loader.epoch == 0  # at the end, not later


@pytest.mark.parametrize("draws", ["host", "dali"])
def test_decoding_only_the_crop_gives_the_full_decodes_pixels(prepped, draws):
    """libjpeg-turbo's ROI decoding of the drawn 224x224 window, then mirror and normalize, against decoding the
    whole 256x256 image and cropping it in the fused pass: the same draws, the same pixels (both the
    decoders' rounding), and the crop path is really taken (its exposed image is the window)."""
    runs = {crop: _run(prepped, True, batches=2, batch_size=8, draws=draws, crop_decode=crop) for crop in (False, True)}
    for whole, window in zip(runs[False], runs[True], strict=True):
        assert whole["image"].shape == (256, 256, 3) and window["image"].shape == (224, 224, 3)
        for k in whole:
            if k not in ("image", "out"):
                np.testing.assert_array_equal(window[k], whole[k])
        np.testing.assert_allclose(window["out"], whole["out"], atol=1.0)
        x, y = (int(round(float(whole[k]) * 32)) for k in ("x", "y"))
        np.testing.assert_allclose(window["image"], whole["image"][y:y + 224, x:x + 224], atol=2)


def test_evaluation_reads_the_same_order_every_epoch_whatever_the_seed(labelled_by_shard):
    """Shuffling is training's: an eval loader over a split (here train's, labelled 0, 1, ...) reads it in one
    fixed order, every epoch, for any seed and whatever --shard-shuffle says."""
    out, sizes = labelled_by_shard

    def epochs(seed, n=1):
        loader = Loader(LoaderConfig(shards=out, split="train", batch_size=4, num_threads=1, seed=seed,
                                     shard_shuffle=True), False)
        return [[int(v) for _, y in loader for v in y if v != PAD_LABEL] for _ in range(n)]

    first, second = epochs(0, 2)
    assert sorted(first) == list(range(sum(sizes))) and first == second == epochs(5)[0]


def test_the_cache_margin_is_the_run_alone_for_a_lone_rank_and_the_runs_in_flight_for_a_shared_node(monkeypatch):
    """Another rank of the node may lag by the runs in flight (DALI's ahead, the one in use, the prepared ones);
    a rank alone on its node needs only the run it reads."""
    from alexnet_pipeline import pipeline

    cfg = LoaderConfig(shards="s3://bucket/data", split="train", device="cpu", rank=1, world_size=4, prefetch=3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pipeline._lag(cfg) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert pipeline._lag(cfg) == 3 + 1 + pipeline.PREPARED
