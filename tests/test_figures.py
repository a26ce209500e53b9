"""The paper's figures, checked by their pixels and numbers: 96 kernel tiles, the real nearest neighbours."""

import shutil

import numpy as np
import torch
from PIL import Image

from alexnet_pipeline import cli, figures, train
from alexnet_pipeline.checkpoint import Checkpoint
from alexnet_pipeline.model import AlexNet, AlexNetConfig


def test_figure_3_has_one_tile_per_kernel_each_normalised_in_two_blocks(tmp_path):
    weight = AlexNet(AlexNetConfig(10)).conv1.weight  # full width: 96 kernels, 11x11x3
    path = figures.filters_figure(weight, tmp_path / "filters.png")
    image = np.asarray(Image.open(path))
    assert np.array_equal(image, figures.filters_mosaic(weight))
    origins = figures.tile_origins(96, 11)
    side = 11 * figures.SCALE
    kernels = figures.normalised_kernels(weight)
    for kernel, (top, left) in zip(kernels, origins, strict=True):  # every tile is its kernel, min to max
        tile = image[top:top + side, left:left + side]
        assert np.array_equal(tile[::figures.SCALE, ::figures.SCALE], np.round(kernel * 255).astype(np.uint8))
    assert len(set(origins)) == 96 and kernels.min() == 0 and kernels.max() == 1
    w = weight.detach().numpy().transpose(0, 2, 3, 1)  # each kernel from its own minimum to its own maximum
    lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(kernels, (w - lo) / (hi - lo), atol=1e-6)
    first, second = {t for t, _ in origins[:48]}, {t for t, _ in origins[48:]}
    assert max(first) + side + figures.BLOCK_GAP <= min(second)  # column 1's kernels above column 2's
    mask = np.ones(image.shape[:2], bool)  # outside the tiles only background
    for top, left in origins:
        mask[top:top + side, left:left + side] = False
    assert (image[mask] == figures.BACKGROUND).all()


def test_nearest_is_the_brute_force_nearest():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 64, generator=g), torch.randn(5, 64, generator=g)
    found = figures.nearest(queries, bank, 6)
    for q, row in zip(queries, found, strict=True):
        distances = ((bank - q) ** 2).sum(1)
        assert row.tolist() == distances.argsort()[:6].tolist()


def test_training_ends_with_figure_3(trained):
    ckpt = Checkpoint.load(trained / train.CHECKPOINT)
    assert np.array_equal(np.asarray(Image.open(trained / train.FILTERS)),
                          figures.filters_mosaic(ckpt.weights["conv1.weight"]))


def test_figure_4_shows_the_predictions_and_the_nearest_training_images_in_fc7(prepped, trained, tmp_path, capsys):
    out = tmp_path / "figs"
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(trained / train.BEST), "--device", "cpu",
                          "--threads", "1", "--batch-size", "4", "--figures", "--figures-out", str(out),
                          "--neighbour-pool", "20"]) == 0
    assert "neighbours among 20 training images" in capsys.readouterr().out
    ckpt = Checkpoint.load(trained / train.BEST)
    drawn = figures.paper_figures(ckpt, prepped, tmp_path / "again", torch.device("cpu"), 20, batch_size=4,
                                  progress=False)
    for name in ("filters.png", "predictions.png", "neighbours.png"):  # the command draws what the library does
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "again" / name)))
    assert np.array_equal(np.asarray(Image.open(out / "filters.png")),
                          figures.filters_mosaic(ckpt.weights["conv1.weight"]))
    assert len(drawn["shown"]) == 8 and drawn["pool"] == 20
    # the neighbours are the nearest of the first 20 training images in fc7, recomputed image by image
    net = ckpt.network("cpu")
    train_images = figures._samples(prepped, "train")
    val_images = figures._samples(prepped, "val")
    from alexnet_pipeline.inference import views

    def fc7(pixels):
        with torch.no_grad():
            return net.hidden(torch.from_numpy(views(pixels, ckpt.mean_to_subtract(), False)))[0]

    bank = torch.stack([fc7(train_images[i][0]) for i in range(20)])
    for q, row in zip(drawn["queries"], drawn["neighbours"], strict=True):
        distances = ((bank - fc7(val_images[q][0])) ** 2).sum(1)
        order = distances.argsort().tolist()
        assert set(row) == set(order[:6]) or np.allclose(sorted(distances[row]), sorted(distances[order[:6]]),
                                                           rtol=1e-3)
    mosaic = np.asarray(Image.open(tmp_path / "again" / "neighbours.png"))
    t, g = figures.THUMB, figures.GAP
    first = mosaic[g:g + t, g + t + g + figures.BLOCK_GAP:g + t + g + figures.BLOCK_GAP + t]
    assert np.array_equal(first, figures._thumb(train_images[drawn["neighbours"][0][0]][0]))
    from alexnet_pipeline.inference import predict_pixels, trained_model

    model = trained_model(ckpt, torch.device("cpu"))
    shown_pixels = [val_images[i][0] for i in drawn["shown"]]
    assert [[p.wnid for p in t] for t in drawn["tops"]] == [[p.wnid for p in t]
                                                            for t in predict_pixels(model, shown_pixels)]
    assert drawn["truths"] == [ckpt.classes[val_images[i][1]] for i in drawn["shown"]]


def test_eval_figures_go_under_figures_out_and_leave_the_runs_filters_png_alone(prepped, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / train.FILTERS).read_bytes()
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(run / train.BEST), "--device", "cpu",
                          "--threads", "1", "--batch-size", "4", "--figures", "--neighbour-pool", "8"]) == 0
    assert (run / train.FILTERS).read_bytes() == before  # training is its one writer
    assert {p.name for p in (run / "figures").iterdir()} == {"filters.png", "predictions.png", "neighbours.png"}


def test_the_neighbour_search_streams_its_bank_in_memory_that_does_not_grow_with_it():
    """The nearest rows of a bank given in chunks equal the brute-force search over the whole bank, and no more
    than two chunks are alive at once, however many there are (the paper's pool: the whole training set)."""
    import weakref

    g = torch.Generator().manual_seed(1)
    queries = torch.randn(5, 64, generator=g)
    alive, most = weakref.WeakSet(), [0]

    def chunks(n):
        gen = torch.Generator().manual_seed(2)
        for _ in range(n):
            chunk = torch.randn(100, 64, generator=gen)
            alive.add(chunk)
            most[0] = max(most[0], len(alive))
            yield chunk
            del chunk

    whole = torch.cat(list(chunks(30)))
    assert figures.nearest(queries, chunks(30), 6).tolist() == figures.nearest(queries, whole, 6).tolist()
    del whole
    most[0] = 0
    figures.nearest(queries, chunks(200), 6)
    assert most[0] <= 2, most


def test_the_figures_read_only_the_shards_they_use(prepped, trained, tmp_path, monkeypatch):
    """A pool of 4 training images reads the first train shard (5 samples), not the split."""
    from alexnet_pipeline import verified

    checked = []
    real = verified.hash_changed
    monkeypatch.setattr(verified, "hash_changed", lambda shards_dir, split, entries, paths, *a: checked.append(
        (split, [p.name for p in paths])) or real(shards_dir, split, entries, paths, *a))
    ckpt = Checkpoint.load(trained / train.BEST)
    drawn = figures.paper_figures(ckpt, prepped, tmp_path / "f", torch.device("cpu"), 4, batch_size=4, progress=False)
    assert drawn["pool"] == 4
    assert ("train", ["train-000000.tar"]) in checked and all(len(p) == 1 for s, p in checked if s == "train")
