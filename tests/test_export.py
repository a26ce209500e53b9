"""alexnet-export: ONNX that onnxruntime runs to the same logits; a state_dict torchvision's AlexNet loads."""

import numpy as np
import onnxruntime as ort  # a test dependency (.[test]): its absence fails, never skips
import pytest
import torch
from torch import nn

from alexnet_pipeline import cli, train
from alexnet_pipeline.checkpoint import Checkpoint

TINY = dict(global_batch=8, log_every=4, num_threads=1, final_tencrop=False, device="cpu", epochs=1)


@pytest.fixture(scope="module")
def checkpoints(prepped, trained, tmp_path_factory):
    """The paper's network trained (the session's run), and a full-width torchvision one as alexnet-train
    writes it at its start (its weights need no training for a test of their layout)."""
    run_dir = tmp_path_factory.mktemp("export") / "torchvision"
    trainer = train.Trainer(train.TrainConfig(shards=prepped, out=run_dir, variant="torchvision", width=1.0, **TINY))
    trainer.save(train.BEST, full=False)
    trainer.run.close()
    return {"paper": trained / train.BEST, "torchvision": run_dir / train.BEST}


def _images(n=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 224, 224), dtype=np.uint8))


def test_onnx_gives_torchs_logits_for_mean_subtracted_float_input(checkpoints, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    assert cli.export_main(["--checkpoint", str(checkpoints["paper"]), "--out", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = Checkpoint.load(checkpoints["paper"])
    mean = torch.from_numpy(ckpt.mean_to_subtract()).float().permute(2, 0, 1)
    x = _images().float() - mean  # the documented input: float32, mean already subtracted
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    got = session.run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        want = ckpt.network("cpu")(x).numpy()
    assert got.shape == (3, len(ckpt.classes))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    five = session.run(["logits"], {"images": (_images(5, 1).float() - mean).numpy()})[0]
    assert five.shape[0] == 5  # the batch dimension is dynamic


def test_onnx_with_uint8_input_has_the_mean_inside(checkpoints, tmp_path):
    path = tmp_path / "model_u8.onnx"
    assert cli.export_main(["--checkpoint", str(checkpoints["paper"]), "--out", str(path), "--input", "uint8"]) == 0
    ckpt = Checkpoint.load(checkpoints["paper"])
    images = _images()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()})[0]
    mean = torch.from_numpy(ckpt.mean_to_subtract()).float().permute(2, 0, 1)
    with torch.no_grad():
        want = ckpt.network("cpu")(images.float() - mean).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def torchvision_alexnet(num_classes):
    """torchvision.models.AlexNet's layers and names (features / avgpool / classifier), as its source has them."""
    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(3, 2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
    return AlexNet()


def _torchvision_or_replica(num_classes):
    """torchvision's own AlexNet where torchvision is installed. The CPU machines' torch 2.13.0 build has no
    matching torchvision wheel (PyPI's fails to import beside it), so there it is a replica of its source;
    only a missing torchvision falls back: a torchvision that is there but broken fails the test."""
    try:
        import torchvision
    except ModuleNotFoundError:
        return torchvision_alexnet(num_classes)
    return torchvision.models.alexnet(num_classes=num_classes)


def test_the_torchvision_state_dict_loads_into_torchvisions_alexnet(checkpoints, tmp_path):
    path = tmp_path / "model.pt"
    assert cli.export_main(["--checkpoint", str(checkpoints["torchvision"]), "--out", str(path)]) == 0
    ckpt = Checkpoint.load(checkpoints["torchvision"])
    theirs = _torchvision_or_replica(len(ckpt.classes))
    theirs.load_state_dict(torch.load(path, weights_only=True))  # strict: every name and shape matches
    x = _images().float() - torch.from_numpy(ckpt.mean_to_subtract()).float().permute(2, 0, 1)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ckpt.network("cpu")(x), rtol=1e-5, atol=1e-5)


def test_the_papers_two_column_network_is_not_given_torchvisions_names(checkpoints, tmp_path, capsys):
    assert cli.export_main(["--checkpoint", str(checkpoints["paper"]), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export this one as ONNX" in err[0] and not (tmp_path / "m.pt").exists()
    assert cli.export_main(["--checkpoint", str(checkpoints["paper"]), "--out", str(tmp_path / "m.zip")]) == 2
