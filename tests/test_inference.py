"""A trained network, used: load_model, predict (the same errors as alexnet-eval), alexnet-predict, names."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_samples
from PIL import Image

import alexnet_pipeline as ap
from alexnet_pipeline import cli, shards, train
from alexnet_pipeline.checkpoint import Checkpoint
from alexnet_pipeline.classnames import ilsvrc2012, parse_hf_classes
from alexnet_pipeline.inference import image_256, views
from alexnet_pipeline.prep import PrepConfig, run


@pytest.fixture(scope="module")
def lively(prepped, trained, tmp_path_factory):
    """A checkpoint whose (He-initialised) network tells images apart, so errors are not trivial: fc8's biases
    are set so that every class has the same mean logit over the val images."""
    out = tmp_path_factory.mktemp("lively")
    ckpt = Checkpoint.load(trained / train.BEST)
    torch.manual_seed(1)
    for name, w in ckpt.weights.items():
        if name.endswith("weight"):
            torch.nn.init.kaiming_normal_(w)
        else:
            w.zero_()
    net = ckpt.network("cpu")
    pixels = [image_256(jpeg) for _, jpeg in read_samples(prepped, "val").values()]
    with torch.no_grad():
        logits = net(torch.from_numpy(np.stack([views(p, ckpt.mean_to_subtract(), False)[0] for p in pixels])))
    ckpt.weights["fc8.bias"] -= logits.mean(0)
    ckpt.save(out / "lively.pt")
    return out / "lively.pt"


def _errors(tops, labels, classes):
    top1 = sum(t[0].wnid != classes[y] for t, y in zip(tops, labels, strict=True)) / len(labels)
    top5 = sum(classes[y] not in [p.wnid for p in t[:5]] for t, y in zip(tops, labels, strict=True)) / len(labels)
    return top1, top5


def test_predict_on_the_val_images_gives_alexnet_evals_errors(prepped, lively, capsys):
    model = ap.load_model(lively, device="cpu")
    assert not model.net.training and model.classes == shards.load_manifest(prepped).classes
    val = list(read_samples(prepped, "val").values())
    assert cli.eval_main(["--shards", str(prepped), "--checkpoint", str(lively), "--device", "cpu", "--threads", "1",
                          "--batch-size", "4", "--json", "--tencrop"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for tencrop in (False, True):
        tops = ap.predict(model, [jpeg for _, jpeg in val], tencrop=tencrop, top=5)
        assert len({t[0].wnid for t in tops}) >= 2  # the network tells images apart: the errors mean something
        assert all(len(t) == 4 and t[0].probability >= t[1].probability for t in tops)  # 4 classes: top 4
        result = evaluated["tencrop" if tencrop else "center"]
        top1, top5 = _errors(tops, [y for y, _ in val], model.classes)
        assert (top1, top5) == pytest.approx((result["top1_error"], result["top5_error"]))


def test_predict_takes_paths_bytes_and_pil_images_alike(sample, lively):
    model = ap.load_model(lively, device="cpu")
    path = sorted((sample[0] / "extracted/val").rglob("*.JPEG"))[0]
    data = path.read_bytes()
    by_path, by_bytes, by_pil = ap.predict(model, [path, data, Image.open(io.BytesIO(data))])
    assert by_path == by_bytes  # decoded as alexnet-prep decodes
    # a PIL image is taken as decoded (at full size, where a file's JPEG may shrink in the DCT domain first)
    assert [p.wnid for p in by_pil] == [p.wnid for p in by_path]
    assert [p.probability for p in by_pil] == pytest.approx([p.probability for p in by_path], abs=0.05)
    assert sum(p.probability for p in ap.predict(model, [path], top=100)[0]) == pytest.approx(1.0, abs=1e-5)


def test_alexnet_predict_prints_names_and_keeps_going_past_an_unreadable_image(sample, lively, tmp_path):
    good = sorted((sample[0] / "extracted/val").rglob("*.JPEG"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    r = subprocess.run([sys.executable, "-m", "alexnet_pipeline", "predict", str(good[0]), str(bad), str(good[1]),
                        "--checkpoint", str(lively), "--device", "cpu", "--top", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"alexnet-predict: {bad}: not an image (text)"]
    lines = r.stdout.splitlines()
    assert lines[0] == str(good[0]) and lines[4] == str(good[1]) and len(lines) == 8
    model, table = ap.load_model(lively, device="cpu"), ilsvrc2012()
    for image, printed in ((good[0], lines[1:4]), (good[1], lines[5:8])):  # each image's top 3, named
        want = ap.predict(model, [image], top=3)[0]
        got = [line.split(None, 2) for line in printed]  # probability, wnid, name
        assert [(w, name) for _, w, name in got] == [(p.wnid, table[p.wnid]) for p in want]
        assert [float(p.rstrip("%")) for p, _, _ in got] == pytest.approx([100 * p.probability for p in want],
                                                                         abs=0.006)
    r = subprocess.run([sys.executable, "-m", "alexnet_pipeline", "predict", str(good[0]), "--checkpoint",
                        str(lively), "--device", "cpu", "--json"], capture_output=True, text=True)
    top = json.loads(r.stdout)[0]["top"]
    assert r.returncode == 0 and len(top) == 4 and {"wnid", "name", "probability", "index"} <= set(top[0])


def test_the_shipped_table_names_the_1000_classes():
    table = ilsvrc2012()
    assert len(table) == 1000 and table["n01440764"] == "tench, Tinca tinca"
    assert table["n15075141"].startswith("toilet tissue") and list(table) == sorted(table)


@pytest.mark.parametrize("layout", ["kaggle", "devkit", "hf"])
def test_prep_records_the_names_found_beside_the_images(sample, tmp_path, layout):
    out = tmp_path / "o"
    run(PrepConfig(sample[0] / layout, out, workers=1, progress=False))
    manifest = shards.load_manifest(out)
    assert manifest.class_names == {w: f"class {w}" for w in manifest.classes}
    assert shards.class_names(manifest)["n01440764"] == "class n01440764"


def test_without_names_beside_the_images_the_table_names_them(prepped):
    manifest = shards.load_manifest(prepped)
    assert manifest.class_names == {}
    assert shards.class_names(manifest)["n01443537"] == "goldfish, Carassius auratus"


def test_hugging_faces_class_table_is_read_as_text():
    text = 'IMAGENET2012_CLASSES = OrderedDict(\n    {\n        "n01440764": "tench, Tinca tinca",\n' \
           '        "n01443537": "goldfish, Carassius \\"auratus\\"",\n    }\n)\n'
    assert parse_hf_classes(text) == {"n01440764": "tench, Tinca tinca", "n01443537": 'goldfish, Carassius "auratus"'}
