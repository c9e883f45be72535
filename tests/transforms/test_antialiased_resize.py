"""AntiAliasedResized: torch's anti-aliasing inside MONAI's Resized, inverted by Invertd like MONAI's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Resize, Resized, ScaleIntensityd

from custom_nets.transforms import AntiAliasedResize, AntiAliasedResized


@pytest.fixture
def hc18_case(shared_data):
    image = sorted((shared_data / "hc18_subset" / "training_set").glob("*_HC.png"))[0]
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), ScaleIntensityd("image")])
    return load({"image": str(image), "label": str(image).replace("_HC.png", "_HC_Annotation.png")})


def test_a_real_frame_is_anti_aliased_by_torch_with_monais_geometry(hc18_case):
    ours = AntiAliasedResized(["image", "label"], (256, 256), mode=["bilinear", "nearest"], anti_aliasing=[True, False])
    theirs = Resized(["image", "label"], (256, 256), mode=["bilinear", "nearest"], anti_aliasing=[True, False])
    a, b = ours(dict(hc18_case)), theirs(dict(hc18_case))
    expected = F.interpolate(hc18_case["image"].as_tensor()[None], (256, 256), mode="bilinear", antialias=True)[0]
    assert torch.equal(a["image"].as_tensor(), expected)
    assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor())  # nearest, not anti-aliased: MONAI's
    assert torch.allclose(a["image"].affine, b["image"].affine)
    # a different filter, the same picture: the two differ by little
    assert float((a["image"] - b["image"]).abs().mean()) < 0.01


def test_invertd_brings_the_prediction_back_to_the_frame(hc18_case):
    resize = AntiAliasedResized("image", (256, 256), mode="bilinear", anti_aliasing=True)
    case = resize(dict(hc18_case))
    case["pred"] = case["image"].clone()
    back = Invertd("pred", transform=Compose([resize]), orig_keys="image")(case)["pred"]
    assert back.shape == hc18_case["image"].shape
    assert torch.allclose(back.affine, hc18_case["image"].affine)
    assert float((back - hc18_case["image"]).abs().mean()) < 0.03


def test_enlarging_is_monais_and_a_volume_is_refused():
    small = torch.rand(1, 16, 20)
    enlarged = AntiAliasedResize((32, 40), mode="bilinear", anti_aliasing=True)(small)
    assert torch.equal(enlarged, Resize((32, 40), mode="bilinear", anti_aliasing=True)(small))
    with pytest.raises(ValueError, match=r"anti-aliases 2D \(C, H, W\) images .* got shape \[1, 40, 40, 40\]"):
        AntiAliasedResize((20, 20, 20), mode="trilinear", anti_aliasing=True)(torch.rand(1, 40, 40, 40))
    assert np.array_equal(AntiAliasedResize((20, 20, 20), mode="trilinear")(torch.rand(1, 40, 40, 40)).shape, (1, 20, 20, 20))

