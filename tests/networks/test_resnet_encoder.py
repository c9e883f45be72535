"""The ResNet encoder: torchvision-compatible names, and loading local weights files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from custom_nets.networks.blocks.resnet_encoder import ResNetEncoder
from custom_nets.networks.nets.adaptive_cenet import AdaptiveCENet
from custom_nets.networks.utils import load_pretrained_encoder

KEY_LIST = Path(__file__).parent / "torchvision_resnet34_keys.txt"


def torchvision_resnet34_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's ``resnet34().state_dict()``, from a list kept in the repository."""
    shapes = {}
    for line in KEY_LIST.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            shapes[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return shapes


def imagenet_like_state_dict() -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's resnet34 (random values; no weights are downloaded)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in torchvision_resnet34_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def test_encoder_keys_and_shapes_match_torchvision():
    expected = {k: v for k, v in torchvision_resnet34_shapes().items() if not k.startswith("fc.")}
    encoder = ResNetEncoder(spatial_dims=2, in_channels=3, depth=34)
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == expected


def test_adaptive_cenet_encoder_uses_the_same_names():
    model = AdaptiveCENet(2, 3, 2)
    encoder_keys = {k.removeprefix("encoder.") for k in model.state_dict() if k.startswith("encoder.")}
    assert encoder_keys == {k for k in torchvision_resnet34_shapes() if not k.startswith("fc.")}


def test_feature_strides_and_channels():
    encoder = ResNetEncoder(2, 1, 34)
    features = encoder(torch.randn(1, 1, 64, 128))
    assert [f.shape[1] for f in features] == encoder.out_channels == [64, 64, 128, 256, 512]
    assert [tuple(f.shape[2:]) for f in features] == [(32, 64), (16, 32), (8, 16), (4, 8), (2, 4)]


def test_local_weights_load_with_the_same_channels(tmp_path):
    state = imagenet_like_state_dict()
    path = tmp_path / "resnet34_imagenet.pth"
    torch.save(state, path)
    model = AdaptiveCENet(2, 3, 2, pretrained_path=path)
    torch.testing.assert_close(model.encoder.layer3[2].conv1.weight, state["layer3.2.conv1.weight"])
    torch.testing.assert_close(model.encoder.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("in_channels", [1, 4])
def test_first_convolution_is_adapted_to_other_channel_counts(tmp_path, in_channels):
    state = imagenet_like_state_dict()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": state}, path)  # a wrapped checkpoint is accepted too
    model = AdaptiveCENet(2, in_channels, 2, pretrained_path=path)
    rgb = state["conv1.weight"]
    expected = rgb.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * 3 / in_channels
    torch.testing.assert_close(model.encoder.conv1.weight, expected)
    # the adapted stem responds to a constant image as the RGB stem does to a grey one
    torch.testing.assert_close(
        torch.nn.functional.conv2d(torch.ones(1, in_channels, 7, 7), model.encoder.conv1.weight),
        torch.nn.functional.conv2d(torch.ones(1, 3, 7, 7), rgb),
    )


def test_wrong_shapes_fail_with_a_clear_message(tmp_path):
    state = imagenet_like_state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad_shapes.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad_shapes\.pth do not fit.*shape mismatch.*layer2\.0\.conv1\.weight"):
        AdaptiveCENet(2, 3, 2, pretrained_path=path)


def test_wrong_keys_fail_with_a_clear_message(tmp_path):
    state = {f"backbone.{k}": v for k, v in imagenet_like_state_dict().items()}
    path = tmp_path / "prefixed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"prefixed\.pth do not fit.*missing key.*unexpected key"):
        AdaptiveCENet(2, 3, 2, pretrained_path=path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        AdaptiveCENet(2, 3, 2, pretrained_path=tmp_path / "nowhere.pth")


def test_corrupt_file(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(imagenet_like_state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read pretrained weights .*truncated\.pth"):
        AdaptiveCENet(2, 3, 2, pretrained_path=path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "malicious.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _RunsCode()}, f)
    with pytest.raises(ValueError, match=r"cannot read pretrained weights .*malicious\.pth"):
        load_pretrained_encoder(ResNetEncoder(2, 3, 34), path)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_resnet101_encoder_widths():
    encoder = ResNetEncoder(2, 3, depth=101)
    assert encoder.out_channels == [64, 256, 512, 1024, 2048]
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(42.5e6, rel=0.01)


def test_unknown_depth():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetEncoder(2, 3, depth=42)
