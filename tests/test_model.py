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


@pytest.mark.parametrize("init,ones_bias,fc_std", [("paper", 1.0, 0.01), ("caffe", 0.1, 0.005)])
def test_initialisation(init, ones_bias, fc_std):
    m = AlexNet(AlexNetConfig(init=init))
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(getattr(m, name).bias == 0)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(m, name).bias == ones_bias)
    for name, std in (("conv2", 0.01), ("fc6", fc_std), ("fc7", fc_std), ("fc8", 0.01)):
        w = getattr(m, name).weight
        assert abs(w.mean().item()) < 1e-4 and abs(w.std().item() - std) < 2e-4, name
    with pytest.raises(ValueError, match="init"):
        AlexNet(AlexNetConfig(init="kaiming"))


def test_flops_per_image_counts_every_layer():
    from alexnet_pipeline.model import flops_per_image

    # the paper's network: 0.724 GMAC forward for one 224x224 image; conv1 alone is 55*55*96*363
    assert flops_per_image(AlexNetConfig())["forward_macs"] == 724_406_816
    assert flops_per_image(AlexNetConfig())["train_flops"] == 6 * 724_406_816
    conv1 = 55 * 55 * 96 * 363
    fc = 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    # conv2-conv5 by hand (grouped layers see half the input channels)
    conv2_5 = 27 * 27 * 256 * 48 * 25 + 13 * 13 * 384 * 256 * 9 + 13 * 13 * 384 * 192 * 9 + 13 * 13 * 256 * 192 * 9
    assert conv1 + conv2_5 + fc == 724_406_816


def test_lrn_follows_relu_on_conv1_and_conv2_only():
    m = AlexNet(AlexNetConfig(width=0.25))
    seen = []
    for name in ("lrn1", "lrn2"):
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.append(
            (name, inp[0].min(), inp[0].shape[-1])))
    m.features(torch.randn(1, 3, 224, 224))
    assert [n for n, _, _ in seen] == ["lrn1", "lrn2"] and all(v >= 0 for _, v, _ in seen)  # inputs are post-ReLU
    assert [side for _, _, side in seen] == [55, 27]  # before each max-pool (after it they would be 27 and 13)
    assert isinstance(AlexNet(AlexNetConfig(variant="torchvision", width=0.25)).lrn1, nn.Identity)


def test_grouped_layers_equal_the_explicit_two_column_computation():
    torch.manual_seed(0)
    m = AlexNet(AlexNetConfig(width=0.25)).eval()
    x = torch.relu(torch.randn(2, m.conv4.in_channels, 13, 13))
    w, b, half_in, half_out = m.conv4.weight, m.conv4.bias, m.conv4.in_channels // 2, m.conv4.out_channels // 2
    columns = [torch.nn.functional.conv2d(x[:, i * half_in:(i + 1) * half_in], w[i * half_out:(i + 1) * half_out],
                                          b[i * half_out:(i + 1) * half_out], padding=1) for i in range(2)]
    torch.testing.assert_close(m.conv4(x), torch.cat(columns, 1))


def test_lrn_is_pytorchs_within_each_column_forward_and_backward():
    torch.manual_seed(0)
    y = (torch.relu(torch.randn(2, 48, 27, 27, dtype=torch.float64)) * 60).requires_grad_()
    lrn = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    ref = torch.cat([lrn(y[:, :24]), lrn(y[:, 24:])], 1)
    ours = GroupedLRN(48, 2).double()(y)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, y, g)[0], torch.autograd.grad(ref, y, g)[0],
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(GroupedLRN(48, 2).double()(y), lrn(y))  # it really does not cross the columns
    # channels_last in, channels_last out (no copy into another layout), same values
    cl = y.detach().float().to(memory_format=torch.channels_last)
    out = GroupedLRN(48, 2)(cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    # bfloat16 (autocast on GPUs): the band is exact ones, so only the inputs' rounding remains
    torch.testing.assert_close(GroupedLRN(48, 2)(y.detach().bfloat16()).double(), ref.detach(), rtol=2e-2, atol=2e-2)


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


def test_split_groups_compute_the_grouped_function_and_gradients():
    """On GPUs the grouped layers run as one dense convolution per column (place() sets split_groups)."""
    torch.manual_seed(0)
    m = AlexNet(AlexNetConfig(num_classes=5, width=0.25)).double().eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64).to(memory_format=torch.channels_last) * 50
    grads = []
    for split in (False, True):
        m.zero_grad()
        m.split_groups = split
        out = m(x)
        out.logsumexp(1).sum().backward()
        grads.append((out.detach(), m.conv2.weight.grad.clone(), m.conv5.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert AlexNet(AlexNetConfig(width=0.25)).split_groups is False


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_conv1_over_space_to_depth_blocks_is_the_same_convolution(variant):
    """On GPUs conv1 runs as a 3x3 convolution over 4x4 blocks (place() sets space_to_depth)."""
    torch.manual_seed(0)
    m = AlexNet(AlexNetConfig(num_classes=5, variant=variant, width=0.25)).double()
    x = (torch.randn(2, 3, 224, 224, dtype=torch.float64) * 50).to(memory_format=torch.channels_last)
    results = []
    for s2d in (False, True):
        m.zero_grad()
        m.space_to_depth = s2d
        y = m._conv1(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        results.append((y.detach(), m.conv1.weight.grad.clone(), m.conv1.bias.grad.clone()))
    assert results[0][0].shape[-2:] == (55, 55)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
