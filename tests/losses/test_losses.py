"""Hybrid Dice + boundary loss, its epoch ramp, and the class-weighted cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.losses import BoundaryLoss, DiceLoss

from custom_nets.handlers.boundary_weight_ramp import BoundaryWeightRamp, boundary_weight_at
from custom_nets.losses.hybrid_dice_boundary import HybridDiceBoundaryLoss
from custom_nets.losses.weighted_cross_entropy import WeightedCrossEntropyLoss, class_frequency_weights

SIZE = 32


def _disc(radius: float, size: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2) <= radius**2).float()


def _toy_problem(mode: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A noisy disc image and its target: label indices (softmax) or two nested multi-label channels (sigmoid)."""
    torch.manual_seed(0)
    outer, inner = _disc(10.0), _disc(5.0)
    image = (outer + 0.5 * inner + 0.2 * torch.randn(SIZE, SIZE))[None, None]
    if mode == "softmax":
        return image, outer[None, None], {"softmax": True, "to_onehot_y": True}
    return image, torch.stack([outer, inner])[None], {"sigmoid": True}  # overlapping, like BraTS WT/TC


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_hybrid_loss_decreases_on_toy_problem(mode):
    image, target, kwargs = _toy_problem(mode)
    loss_fn = HybridDiceBoundaryLoss(boundary_weight=0.1, **kwargs)  # mid-ramp weight
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = loss_fn(net(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    # the fit is real, not a drift of the signed boundary term alone
    assert DiceLoss(**kwargs)(net(image), target).item() < 0.2


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
@pytest.mark.parametrize("fill", [0.0, 1.0], ids=["empty", "full"])
def test_hybrid_loss_finite_on_uniform_masks(mode, fill):
    kwargs = {"softmax": True, "to_onehot_y": True} if mode == "softmax" else {"sigmoid": True}
    channels = 2 if mode == "softmax" else 3
    target = torch.full((2, 1 if mode == "softmax" else channels, SIZE, SIZE), fill)
    logits = torch.randn(2, channels, SIZE, SIZE, requires_grad=True)
    loss_fn = HybridDiceBoundaryLoss(boundary_weight=1.0, **kwargs)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # no contour, no boundary term: MONAI's zero distance map for empty and full masks
    assert loss_fn.boundary(logits, target).item() == 0.0


@pytest.mark.parametrize("activations", [{}, {"sigmoid": True, "softmax": True}], ids=["neither", "both"])
def test_hybrid_loss_needs_exactly_one_activation(activations):
    with pytest.raises(ValueError, match="exactly one activation"):
        HybridDiceBoundaryLoss(**activations)


def test_hybrid_loss_is_weighted_sum_of_monai_terms():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, SIZE, SIZE)
    labels = torch.randint(0, 3, (2, 1, SIZE, SIZE))
    loss_fn = HybridDiceBoundaryLoss(softmax=True, to_onehot_y=True, lambda_dice=0.7, boundary_weight=0.3)
    expected = 0.7 * DiceLoss(softmax=True, to_onehot_y=True)(logits, labels) + 0.3 * BoundaryLoss(
        softmax=True, to_onehot_y=True
    )(logits, labels)
    torch.testing.assert_close(loss_fn(logits, labels), expected)
    loss_fn.boundary_weight = 0.0  # mutable attribute: what the ramp sets
    torch.testing.assert_close(loss_fn(logits, labels), 0.7 * DiceLoss(softmax=True, to_onehot_y=True)(logits, labels))


@pytest.mark.parametrize(
    "logits_shape, target_shape, kwargs, message",
    [
        ((2, 1, 8, 8), (2, 1, 8, 8), {"softmax": True}, "at least 2 output channels"),
        ((2, 3, 8, 8), (2, 1, 8, 8), {"sigmoid": True}, "does not fit"),
        ((2, 3, 8, 8), (2, 1, 8, 16), {"softmax": True, "to_onehot_y": True}, "does not fit"),
        ((2, 3, 8), (2, 3, 8), {"sigmoid": True}, "BNHW"),
    ],
)
def test_hybrid_loss_rejects_bad_shapes(logits_shape, target_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridDiceBoundaryLoss(**kwargs)(torch.randn(logits_shape), torch.zeros(target_shape))


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0.0), (1, 0.0), (2, 0.25), (3, 0.5), (5, 1.0), (100, 1.0)],
)
def test_boundary_weight_at_linear_then_clamped(epoch, expected):
    assert boundary_weight_at(epoch, max_weight=1.0, ramp_epochs=4, start_weight=0.0) == pytest.approx(expected)


def test_boundary_weight_at_without_ramp_is_max():
    assert boundary_weight_at(1, max_weight=0.5, ramp_epochs=0, start_weight=0.01) == 0.5


def _record_weights(loss: HybridDiceBoundaryLoss, engine: Engine) -> list[tuple[int, float]]:
    seen: list[tuple[int, float]] = []
    engine.add_event_handler(
        Events.ITERATION_STARTED, lambda e: seen.append((e.state.epoch, loss.boundary_weight))
    )
    return seen


def test_ramp_handler_sets_weight_each_epoch_on_ignite_engine():
    loss = HybridDiceBoundaryLoss(softmax=True, to_onehot_y=True, boundary_weight=123.0)
    trainer = Engine(lambda engine, batch: None)
    BoundaryWeightRamp(loss, max_weight=0.5, ramp_epochs=2, start_weight=0.1).attach(trainer)
    seen = _record_weights(loss, trainer)
    trainer.run(range(2), max_epochs=4)
    expected = [0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5]
    assert [epoch for epoch, _ in seen] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [w for _, w in seen] == pytest.approx(expected)
    assert trainer.state.boundary_weight == pytest.approx(0.5)


def test_ramp_handler_is_resume_safe():
    loss = HybridDiceBoundaryLoss(sigmoid=True, boundary_weight=0.01)
    trainer = Engine(lambda engine, batch: None)
    BoundaryWeightRamp(loss, max_weight=1.0, ramp_epochs=4, start_weight=0.0).attach(trainer)
    trainer.load_state_dict({"epoch": 2, "epoch_length": 1, "max_epochs": 4})  # as a checkpoint restores it
    seen = _record_weights(loss, trainer)
    trainer.run(range(1))
    assert seen == [(3, pytest.approx(0.5)), (4, pytest.approx(0.75))]


def test_ramp_handler_rejects_loss_without_weight():
    with pytest.raises(TypeError, match="boundary_weight"):
        BoundaryWeightRamp(DiceLoss(softmax=True))


def test_ramp_handler_from_bundle_config():
    parser = ConfigParser(
        {
            "loss": {"_target_": "custom_nets.losses.hybrid_dice_boundary.HybridDiceBoundaryLoss", "softmax": True},
            "ramp": {
                "_target_": "custom_nets.handlers.boundary_weight_ramp.BoundaryWeightRamp",
                "loss": "@loss",
                "max_weight": 1.0,
                "ramp_epochs": 10,
            },
        }
    )
    ramp = parser.get_parsed_content("ramp")
    assert ramp.loss is parser.get_parsed_content("loss")
    trainer = Engine(lambda engine, batch: None)
    ramp.attach(trainer)
    trainer.run(range(1), max_epochs=2)
    assert ramp.loss.boundary_weight == pytest.approx(0.01 + 0.99 / 10)


# two "images": 4 px with classes {0, 1}, 8 px with classes {0, 2}
LABEL_MAPS = [np.array([[0, 0, 0, 1]]), np.array([[0, 0, 2, 2], [0, 0, 2, 2]])]


@pytest.mark.parametrize(
    "method, expected",
    [
        # freq = pixels / pixels of images holding the class = (7/12, 1/4, 4/8); median 0.5
        ("median", [0.5 / (7 / 12), 0.5 / 0.25, 0.5 / 0.5]),
        # total / (classes * pixels) = 12 / (3 * (7, 1, 4))
        ("inverse", [12 / 21, 12 / 3, 12 / 12]),
    ],
)
def test_class_frequency_weights_on_known_label_maps(method, expected):
    assert class_frequency_weights(LABEL_MAPS, num_classes=3, method=method) == pytest.approx(expected)


def test_class_frequency_weights_accepts_tensors_and_ignore_index():
    maps = [torch.tensor([[0, 1, 255, 255]]), torch.tensor([[0, 0, 1, 255]])]
    assert class_frequency_weights(maps, 2, method="inverse", ignore_index=255) == pytest.approx([5 / 6, 5 / 4])


@pytest.mark.parametrize(
    "maps, num_classes, message",
    [
        (LABEL_MAPS, 4, r"class\(es\) \[3\] never occur"),
        (LABEL_MAPS, 2, "outside"),
        ([], 3, "no label maps"),
        ([np.array([0.5, 1.0])], 2, "non-integer"),
    ],
)
def test_class_frequency_weights_rejects_bad_labels(maps, num_classes, message):
    with pytest.raises(ValueError, match=message):
        class_frequency_weights(maps, num_classes=num_classes)


def test_weighted_cross_entropy_matches_hand_computation():
    torch.manual_seed(2)
    weights = [0.2, 1.0, 3.0]
    logits = torch.randn(2, 3, 5, 5)
    labels = torch.randint(0, 3, (2, 1, 5, 5))
    loss = WeightedCrossEntropyLoss(class_weights=weights)(logits, labels)
    # weighted mean of -log p(true class), weights of the true class per pixel
    log_p = torch.log_softmax(logits, dim=1).gather(1, labels)
    w = torch.tensor(weights)[labels]
    torch.testing.assert_close(loss, (-(w * log_p).sum() / w.sum()))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels[:, 0], weight=torch.tensor(weights)))


def test_weighted_cross_entropy_one_hot_target_uses_probability_form():
    torch.manual_seed(3)
    weights = torch.tensor([0.5, 2.0])
    logits = torch.randn(2, 2, 4, 4)
    one_hot = F.one_hot(torch.randint(0, 2, (2, 4, 4)), 2).permute(0, 3, 1, 2).float()
    loss = WeightedCrossEntropyLoss(class_weights=weights)(logits, one_hot)
    torch.testing.assert_close(loss, F.cross_entropy(logits, one_hot, weight=weights))


@pytest.mark.parametrize(
    "weights, labels, message",
    [
        ([1.0, 2.0], torch.zeros(1, 1, 4, 4), "2 class weights for logits with 3 channels"),
        (None, torch.full((1, 1, 4, 4), 3), r"outside \[0, 3\)"),
        (None, torch.zeros(1, 2, 4, 4), "does not fit"),
    ],
)
def test_weighted_cross_entropy_rejects_bad_input(weights, labels, message):
    with pytest.raises(ValueError, match=message):
        WeightedCrossEntropyLoss(class_weights=weights)(torch.randn(1, 3, 4, 4), labels)


def test_weighted_cross_entropy_rejects_negative_weights():
    with pytest.raises(ValueError, match=">= 0"):
        WeightedCrossEntropyLoss(class_weights=[1.0, -1.0])
