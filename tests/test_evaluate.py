import numpy as np
import torch

from alexnet_pipeline import augment, evaluate
from alexnet_pipeline.model import AlexNet, AlexNetConfig
from alexnet_pipeline.pipeline import PAD_LABEL, Loader, LoaderConfig, eval_loader
from alexnet_pipeline.shards import load_manifest


def _model(classes=4):
    torch.manual_seed(0)
    net = AlexNet(AlexNetConfig(num_classes=classes, width=0.25))
    for m in net.modules():  # a livelier init than the paper's, so that predictions differ between images
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return net.eval()


def test_ten_crop_equals_ten_forward_passes_with_averaged_softmax(prepped):
    model = _model()
    with np.load(prepped / "stats.npz") as z:
        mean = augment.mean_to_subtract({k: z[k] for k in z.files}, "channel")
    # the reference: the decoded images of the same pipeline, cropped by the numpy oracle, one view at a time
    cfg = LoaderConfig(shards=prepped, split="val", batch_size=5, num_threads=2, mean="channel", batches_per_run=1)
    pipe = Loader(cfg, train=False).graph(expose=True)  # a run per batch, as the loader below
    loader = eval_loader(prepped, batch_size=5, num_threads=2, tencrop=True, mean="channel", batches_per_run=1)
    checked, first = 0, None
    for probs, labels in evaluate.predictions(model, loader, tencrop=True):
        first = probs if first is None else first
        decoded = pipe.run()[2]
        for i in range(len(labels)):
            if labels[i] == PAD_LABEL:
                continue
            views = augment.ten_crop(np.array(decoded[i]), mean)
            with torch.no_grad():
                ref = torch.stack([model(torch.from_numpy(v)[None]).softmax(1)[0] for v in views]).mean(0)
            torch.testing.assert_close(probs[i], ref, atol=1e-4, rtol=1e-3)
            checked += 1
    assert checked == loader.n_samples
    center = next(iter(evaluate.predictions(model, eval_loader(prepped, batch_size=5, num_threads=2, mean="channel"),
                                            False)))[0]
    assert not torch.allclose(center, first, atol=1e-3)  # the ten views really are averaged


def test_error_counts_match_predictions_and_skip_padding(prepped):
    model = _model()
    loader = eval_loader(prepped, batch_size=5, num_threads=2)  # 5 does not divide the val split: padding
    probs, labels = map(torch.cat, zip(*evaluate.predictions(model, loader, tencrop=False), strict=True))
    assert (labels == PAD_LABEL).any()
    keep = labels != PAD_LABEL
    probs, labels = probs[keep], labels[keep]
    top5 = probs.topk(4, 1).indices  # 4 classes: top-5 is every class
    expected = [len(labels), int((probs.argmax(1) == labels).sum()), int((top5 == labels[:, None]).any(1).sum())]
    counts = evaluate.error_counts(model, loader)
    assert counts.tolist() == expected and expected[2] == expected[0]
    e = evaluate.errors(counts)
    assert e["images"] == loader.n_samples and abs(e["top1_error"] - (1 - expected[1] / expected[0])) < 1e-12
    assert evaluate.errors(torch.tensor([8, 2, 6])) == {"images": 8, "top1_error": 0.75, "top5_error": 0.25}


def test_the_eval_command_gives_center_errors_and_with_tencrop_ten_crop_errors_too(prepped, trained):
    base = dict(shards=prepped, checkpoint=trained / "checkpoint.pt", device="cpu", batch_size=5)
    center = evaluate.run(evaluate.EvalConfig(**base))
    n_val = sum(e.samples for e in load_manifest(prepped).splits["val"].shards)
    assert "tencrop" not in center and center["center"]["images"] == n_val and center["epoch"] == 2
    both = evaluate.run(evaluate.EvalConfig(**base, tencrop=True))
    assert both["center"] == center["center"] and both["tencrop"]["images"] == n_val
