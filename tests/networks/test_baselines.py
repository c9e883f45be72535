"""Baseline networks: CENet (and its DAC / RMP / decoder blocks), ShallowSegNet, ResNetUNet."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from custom_nets.networks.blocks.cenet_decoder_block import CENetDecoderBlock
from custom_nets.networks.blocks.dense_atrous_conv import DenseAtrousConv
from custom_nets.networks.blocks.residual_multikernel_pooling import ResidualMultiKernelPooling
from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder
from custom_nets.networks.nets.cenet import CENet
from custom_nets.networks.nets.resnet_unet import ResNetUNet
from custom_nets.networks.nets.shallow_segnet import ShallowSegNet

BUILDERS = {
    "cenet": lambda cin, cout: CENet(spatial_dims=2, in_channels=cin, out_channels=cout),
    "shallow_segnet": lambda cin, cout: ShallowSegNet(spatial_dims=2, in_channels=cin, out_channels=cout),
    "resnet34_unet": lambda cin, cout: ResNetUNet(spatial_dims=2, in_channels=cin, out_channels=cout, depth=34),
    "resnet101_unet": lambda cin, cout: ResNetUNet(spatial_dims=2, in_channels=cin, out_channels=cout, depth=101),
}
# Res101 is only built for the shape tests; the rest of the behaviour is the same code as ResNet-34's.
LIGHT = ["cenet", "shallow_segnet", "resnet34_unet"]
SIZES = [(64, 96), (96, 64), (128, 128), (256, 192)]


@functools.lru_cache(maxsize=None)
def built(name: str, in_channels: int = 1, out_channels: int = 2) -> torch.nn.Module:
    """One seeded eval-mode instance per configuration, shared by the tests (building is the slow part)."""
    torch.manual_seed(0)
    return BUILDERS[name](in_channels, out_channels).eval()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_at_input_size(name, size):
    net = built(name)
    with torch.no_grad():
        out = net(torch.rand(1, 1, *size))
    assert out.shape == (1, 2, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels,out_channels", [(3, 1), (4, 3)])
@pytest.mark.parametrize("name", LIGHT)
def test_any_channel_counts(name, in_channels, out_channels):
    net = built(name, in_channels, out_channels)
    with torch.no_grad():
        out = net(torch.rand(2, in_channels, 64, 64))
    assert out.shape == (2, out_channels, 64, 64)


@pytest.mark.parametrize("name", LIGHT)
def test_side_not_multiple_of_divisor_names_size(name):
    with pytest.raises(ValueError, match=r"\[33, 64\]"):
        built(name)(torch.rand(1, 1, 33, 64))


@pytest.mark.parametrize("name", LIGHT)
def test_wrong_channel_count_is_clear(name):
    with pytest.raises(ValueError, match="expected 1 input channel"):
        built(name)(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("name", LIGHT)
def test_wrong_dimensionality_is_clear(name):
    with pytest.raises(ValueError, match="expected a 4D input"):
        built(name)(torch.rand(1, 1, 32, 32, 32))


@pytest.mark.parametrize("name", LIGHT)
def test_torchscript_script_matches_eager(name):
    net = built(name)
    x = torch.rand(2, 1, 64, 96)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", LIGHT)
def test_torchscript_trace_matches_eager(name):
    net = built(name)
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), net(x), atol=1e-4, rtol=1e-4)


def test_cenet_parameter_count_matches_official():
    n_params = sum(p.numel() for p in CENet(spatial_dims=2, in_channels=3, out_channels=1).parameters())
    assert 28_500_000 <= n_params <= 29_500_000, n_params


def test_cenet_runs_on_2x2_bottleneck():
    with torch.no_grad():
        out = built("cenet")(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 2, 64, 64)


def test_rmp_clamps_pools_to_small_map():
    rmp = ResidualMultiKernelPooling(spatial_dims=2, in_channels=8).eval()
    x = torch.rand(2, 8, 2, 2)
    with torch.no_grad():
        out = rmp(x)
        global_max = rmp.conv(x.amax(dim=(2, 3), keepdim=True))
    assert out.shape == (2, 12, 2, 2)
    # Every pool covers the whole 2x2 map, so each of the four maps is the conv of the global max.
    torch.testing.assert_close(out[:, :4], global_max.expand(2, 4, 2, 2))
    torch.testing.assert_close(out[:, 4:], x)


def test_rmp_matches_fixed_pools_on_large_map():
    rmp = ResidualMultiKernelPooling(spatial_dims=2, in_channels=8).eval()
    x = torch.rand(1, 8, 14, 12)
    with torch.no_grad():
        expected = [
            F.interpolate(rmp.conv(torch.nn.MaxPool2d(k, k)(x)), size=(14, 12), mode="bilinear", align_corners=False)
            for k in (2, 3, 5, 6)
        ]
        torch.testing.assert_close(rmp(x), torch.cat(expected + [x], dim=1))


def test_dac_keeps_shape_and_starts_with_zero_bias():
    dac = DenseAtrousConv(spatial_dims=2, channels=16)
    assert all(torch.count_nonzero(m.bias) == 0 for m in (dac.dilate1, dac.dilate2, dac.dilate3, dac.conv1x1))
    assert (dac.dilate1.dilation, dac.dilate2.dilation, dac.dilate3.dilation) == ((1, 1), (3, 3), (5, 5))
    assert dac(torch.rand(1, 16, 4, 6)).shape == (1, 16, 4, 6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cenet_blocks_build_in_2d_and_3d(spatial_dims):
    size = (4, 6, 2)[:spatial_dims]
    x = torch.rand(1, 16, *size)
    assert DenseAtrousConv(spatial_dims, 16)(x).shape == x.shape
    assert ResidualMultiKernelPooling(spatial_dims, 16)(x).shape == (1, 20, *size)
    up = CENetDecoderBlock(spatial_dims, in_channels=16, out_channels=8)(x)
    assert up.shape == (1, 8, *(2 * s for s in size))


def test_shallow_segnet_3d():
    net = ShallowSegNet(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 8)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 8, 12, 16))
    assert out.shape == (1, 3, 8, 12, 16)


@pytest.fixture(scope="module")
def resnet34_weights(tmp_path_factory):
    """A torchvision-style resnet34 state dict (RGB stem plus a classifier) in a local file."""
    torch.manual_seed(1)
    state = ResNetEncoder(spatial_dims=2, in_channels=3, depth=34).state_dict()
    state["fc.weight"] = torch.rand(1000, 512)
    state["fc.bias"] = torch.rand(1000)
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("net_type", [CENet, ResNetUNet])
def test_pretrained_encoder_weights_are_loaded(net_type, resnet34_weights):
    path, state = resnet34_weights
    net = net_type(spatial_dims=2, in_channels=3, out_channels=1, pretrained_path=path)
    loaded = net.encoder.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.bn2.running_var"):
        torch.testing.assert_close(loaded[key], state[key])


def test_pretrained_stem_is_adapted_to_input_channels(resnet34_weights):
    path, state = resnet34_weights
    net = ResNetUNet(spatial_dims=2, in_channels=1, out_channels=1, depth=34, pretrained_path=path)
    torch.testing.assert_close(net.encoder.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))


def test_pretrained_weights_of_wrong_depth_fail_clearly(resnet34_weights):
    path, _ = resnet34_weights
    with pytest.raises(ValueError, match="do not fit the ResNet encoder"):
        ResNetUNet(spatial_dims=2, in_channels=3, out_channels=1, depth=101, pretrained_path=path)
