"""AdaptiveCENet and its blocks: shapes, input checks, TorchScript, the learned atrous mix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from custom_nets.networks.blocks.adaptive_atrous_conv import AdaptiveAtrousConv
from custom_nets.networks.blocks.attention_rmp import AttentionRMP
from custom_nets.networks.nets.adaptive_cenet import AdaptiveCENet


@pytest.fixture(scope="module")
def net() -> AdaptiveCENet:
    torch.manual_seed(0)
    return AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2).eval()


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64), (128, 128), (256, 192)])
def test_logits_at_input_size(net, size):
    with torch.no_grad():
        assert net(torch.randn(2, 1, *size)).shape == (2, 2, *size)


@pytest.mark.parametrize("in_channels,out_channels", [(1, 1), (3, 2), (4, 3)])
def test_any_channel_counts(in_channels, out_channels):
    model = AdaptiveCENet(2, in_channels, out_channels).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, out_channels, 64, 64)


def test_three_dimensional_input():
    model = AdaptiveCENet(3, 2, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 64, 32, 32)).shape == (1, 3, 64, 32, 32)


@pytest.mark.parametrize("size", [(33, 64), (64, 100), (250, 256)])
def test_side_not_multiple_of_32_names_size(net, size):
    with pytest.raises(ValueError, match=rf"multiple of 32, got size \[{size[0]}, {size[1]}\]"):
        net(torch.randn(1, 1, *size))


def test_wrong_channel_count(net):
    with pytest.raises(ValueError, match="expected 1 input channel"):
        net(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64), (1, 1, 32, 32, 32)])
def test_wrong_dimensionality(net, shape):
    with pytest.raises(ValueError, match="expected a 4D input"):
        net(torch.randn(*shape))


def test_scripted_module_raises_the_same_message(net):
    scripted = torch.jit.script(net)
    with pytest.raises(Exception, match="multiple of 32"):
        scripted(torch.randn(1, 1, 40, 64))


@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_matches_eager(net, export):
    x = torch.randn(1, 1, 96, 128)
    exported = torch.jit.script(net) if export == "script" else torch.jit.trace(net, x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), atol=1e-4, rtol=1e-4)


def test_rmp_is_safe_on_small_bottlenecks():
    rmp = AttentionRMP(spatial_dims=2, in_channels=8)
    for side in (1, 2, 3, 7):
        assert rmp(torch.randn(2, 8, side, side)).shape == (2, 12, side, side)


def test_dilation_weights_start_uniform_and_sum_to_one(net):
    weights = net.dilation_weights()
    assert list(weights) == [1, 3, 5, 7]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(w == pytest.approx(0.25) for w in weights.values())


def test_atrous_mix_is_learned():
    torch.manual_seed(0)
    aac = AdaptiveAtrousConv(spatial_dims=2, in_channels=16, reduction=2)
    optimizer = torch.optim.Adam(aac.parameters(), lr=0.05)
    x, target = torch.randn(4, 16, 12, 12), torch.randn(4, 16, 12, 12)
    before = aac.mixing_logits.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(aac(x), target)
        loss.backward()
        assert aac.mixing_logits.grad is not None and aac.mixing_logits.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.allclose(aac.mixing_logits.detach(), before)
    assert sum(aac.dilation_weights().values()) == pytest.approx(1.0)


def test_network_mixing_logits_receive_gradients():
    model = AdaptiveCENet(2, 1, 2)
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    assert model.aac.mixing_logits.grad is not None
    assert model.aac.mixing_logits.grad.abs().sum() > 0


def test_norm_and_act_with_arguments_reach_every_block_after_the_encoder():
    """``(name, {args})`` as in MONAI's nets: it raised (norm) or lost its arguments (act) in the AAC before."""
    net = AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2, norm=("group", {"num_groups": 8}), act=("leakyrelu", {"negative_slope": 0.1}))
    after_encoder = [m for name, m in net.named_modules() if not name.startswith("encoder")]
    assert not [m for m in after_encoder if isinstance(m, nn.BatchNorm2d)]
    groups = [m for m in after_encoder if isinstance(m, nn.GroupNorm)]
    leaky = [m for m in after_encoder if isinstance(m, nn.LeakyReLU)]
    assert groups and all(m.num_groups == 8 for m in groups)
    assert leaky and all(m.negative_slope == 0.1 for m in leaky)
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64)


def test_the_default_norm_and_act_keep_the_state_dict_of_trained_checkpoints(net):
    explicit = AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2, norm="batch", act="relu")
    assert list(explicit.state_dict()) == list(net.state_dict())
