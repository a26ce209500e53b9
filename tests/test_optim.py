"""The paper's update rule, replayed as plain scalars, against the optimizer the trainer uses."""

import pytest
import torch
from torch import nn

from alexnet_pipeline.optim import PaperSGD


def _paper_replay(w0, grads_of, lrs, momentum=0.9, decay=5e-4, decayed=(True,)):
    """The paper's formula, one Python float per parameter: v <- m v - decay eps w - eps grad; w <- w + v."""
    w, v, out = list(w0), [0.0] * len(w0), []
    for eps in lrs:
        g = grads_of(w)
        v = [momentum * vi - (decay * eps * wi if d else 0.0) - eps * gi
             for vi, wi, gi, d in zip(v, w, g, decayed, strict=True)]
        w = [wi + vi for wi, vi in zip(w, v, strict=True)]
        out.append(list(w))
    return out


def _run(rule, lrs, decay_biases=False):
    """The trainer's optimizer on a weight (2 elements) and a bias (1 element), float64, through lr drops."""
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.fill_(0.5)
    opt = PaperSGD(layer.named_parameters(), lrs[0], decay_biases=decay_biases, rule=rule)
    c = torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64)
    out = []
    for eps in lrs:
        opt.set_lr(eps)
        opt.zero_grad()
        params = torch.cat([layer.weight.flatten(), layer.bias])
        (0.5 * c * params**2).sum().backward()  # gradient c * w, known in closed form
        opt.step()
        out.append(torch.cat([layer.weight.flatten(), layer.bias]).tolist())
    return out


LRS = [0.01] * 6 + [0.001] * 6 + [0.0001] * 3  # two drops, as the schedule makes them


def test_the_optimizer_is_the_papers_rule_step_for_step_through_lr_drops():
    want = _paper_replay([1.0, -2.0, 0.5], lambda w: [3.0 * w[0], 0.5 * w[1], 2.0 * w[2]], LRS,
                         decayed=(True, True, False))
    got = _run("paper", LRS)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), step


def test_torchs_convention_differs_at_a_drop():
    """torch's SGD (the `torch` rule) matches while eps is constant and departs at the first drop: the test
    above would fail with it."""
    want = _paper_replay([1.0, -2.0, 0.5], lambda w: [3.0 * w[0], 0.5 * w[1], 2.0 * w[2]], LRS,
                         decayed=(True, True, False))
    got = _run("torch", LRS)
    assert got[5] == pytest.approx(want[5], rel=1e-12)
    assert got[6] != pytest.approx(want[6], rel=1e-6)


def test_biases_are_not_decayed_unless_asked():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    opt = PaperSGD(net.named_parameters(), 0.01)
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(4, 3, 3, 3): 5e-4, (4,): 0.0, (2, 4): 5e-4, (2,): 0.0}
    opt = PaperSGD(net.named_parameters(), 0.01, decay_biases=True)
    assert {g["weight_decay"] for g in opt.param_groups} == {5e-4}
    # and the replay agrees when biases are decayed too
    want = _paper_replay([1.0, -2.0, 0.5], lambda w: [3.0 * w[0], 0.5 * w[1], 2.0 * w[2]], LRS,
                         decayed=(True, True, True))
    assert _run("paper", LRS, decay_biases=True)[-1] == pytest.approx(want[-1], rel=1e-12)


def test_state_round_trip_continues_identically():
    lrs = [0.01] * 3 + [0.001] * 3
    whole = _run("paper", lrs)
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.fill_(0.5)
    c = torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64)

    def steps(opt, eps_list):
        for eps in eps_list:
            opt.set_lr(eps)
            opt.zero_grad()
            (0.5 * c * torch.cat([layer.weight.flatten(), layer.bias]) ** 2).sum().backward()
            opt.step()

    first = PaperSGD(layer.named_parameters(), 0.01)
    steps(first, lrs[:3])
    state = first.state_dict()
    assert all(t.device.type == "cpu" for t in state["momentum"].values())
    second = PaperSGD(layer.named_parameters(), 0.5)  # built with another lr, as a resumed trainer may be
    second.load_state_dict(state)
    steps(second, lrs[3:])  # the drop happens after the restore
    assert torch.cat([layer.weight.flatten(), layer.bias]).tolist() == pytest.approx(whole[-1], rel=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        PaperSGD(nn.Linear(3, 1).named_parameters(), 0.01).load_state_dict({**state, "momentum": {}})
