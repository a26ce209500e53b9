import pytest
import torch
from torch import nn

from alexnet_pipeline.model import AlexNet, AlexNetConfig, GroupedLRN


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    assert _params(AlexNet()) == 60_965_224  # the paper's network, two columns
    assert _params(AlexNet(AlexNetConfig(variant="torchvision"))) == 61_100_840  # torchvision's alexnet
    assert _params(AlexNet(AlexNetConfig(num_classes=10, width=0.25))) < 5_000_000


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_shapes(variant):
    m = AlexNet(AlexNetConfig(num_classes=7, variant=variant, width=0.25)).eval()
    x = torch.randn(2, 3, 224, 224)
    assert m.conv1(torch.nn.functional.pad(x, m.pad1)).shape[-2:] == (55, 55)
    assert m.features(x).shape[-2:] == (6, 6)
    assert m(x).shape == (2, 7)


def test_paper_initialisation():
    m = AlexNet()
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(getattr(m, name).bias == 0)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(m, name).bias == 1)
    w = m.fc6.weight
    assert abs(w.mean().item()) < 1e-4 and abs(w.std().item() - 0.01) < 1e-4


def test_lrn_follows_relu_on_conv1_and_conv2_only():
    m = AlexNet(AlexNetConfig(width=0.25))
    seen = []
    for name in ("lrn1", "lrn2"):
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].min())))
    m.features(torch.randn(1, 3, 224, 224))
    assert [n for n, _ in seen] == ["lrn1", "lrn2"] and all(v >= 0 for _, v in seen)  # inputs are post-ReLU
    assert isinstance(AlexNet(AlexNetConfig(variant="torchvision", width=0.25)).lrn1, nn.Identity)


def test_grouped_layers_equal_the_explicit_two_column_computation():
    torch.manual_seed(0)
    m = AlexNet(AlexNetConfig(width=0.25)).eval()
    x = torch.relu(torch.randn(2, m.conv4.in_channels, 13, 13))
    w, b, half_in, half_out = m.conv4.weight, m.conv4.bias, m.conv4.in_channels // 2, m.conv4.out_channels // 2
    columns = [torch.nn.functional.conv2d(x[:, i * half_in:(i + 1) * half_in], w[i * half_out:(i + 1) * half_out],
                                          b[i * half_out:(i + 1) * half_out], padding=1) for i in range(2)]
    torch.testing.assert_close(m.conv4(x), torch.cat(columns, 1))
    y = torch.relu(torch.randn(2, 48, 27, 27))
    lrn = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    torch.testing.assert_close(GroupedLRN(2)(y), torch.cat([lrn(y[:, :24]), lrn(y[:, 24:])], 1))
    assert not torch.allclose(GroupedLRN(2)(y * 40), lrn(y * 40))  # it really does not cross the columns


def test_two_columns_compute_the_grouped_function():
    from alexnet_pipeline.model import TwoColumnAlexNet

    torch.manual_seed(0)
    # float64: the layouts sum in different orders, and float32 gradients of this init differ by ~1% of scale
    grouped = AlexNet(AlexNetConfig(num_classes=5, width=0.25)).eval().double()
    split = TwoColumnAlexNet(grouped, devices=("cpu", "cpu")).eval()  # two CPU "devices"
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64)
    torch.testing.assert_close(split(x), grouped(x))
    assert {k: v.shape for k, v in split.grouped_state_dict().items()} == \
        {k: v.shape for k, v in grouped.state_dict().items()}
    for k, v in split.grouped_state_dict().items():
        torch.testing.assert_close(v, grouped.state_dict()[k])
    # gradients agree too, after mapping the column halves back to the grouped layout
    for m in (grouped, split):
        m(x).logsumexp(1).sum().backward()
    for name in ("conv1", "conv3", "conv5", "fc6"):
        torch.testing.assert_close(torch.cat([getattr(c, name).weight.grad for c in split.columns]),
                                   getattr(grouped, name).weight.grad)
    with pytest.raises(ValueError, match="torchvision"):
        TwoColumnAlexNet(AlexNet(AlexNetConfig(variant="torchvision", width=0.25)), ("cpu", "cpu"))


def test_narrow_paper_init_keeps_the_full_networks_signal_scale():
    stds = {}
    for width in (1.0, 0.25):
        torch.manual_seed(0)
        m = AlexNet(AlexNetConfig(width=width)).eval()
        x = torch.randn(2, 3, 224, 224) * 50  # mean-subtracted 0-255 pixels
        stds[width] = m.features(x).std().item()
    assert 0.6 < stds[0.25] / stds[1.0] < 1.6
