"""Dice + boundary loss (docs/design.md, "Loss"): region overlap from Dice, contours from Kervadec's boundary loss."""

from __future__ import annotations

import torch
from monai.losses import BoundaryLoss, DiceLoss
from torch.nn.modules.loss import _Loss

__all__ = ["HybridDiceBoundaryLoss"]


class HybridDiceBoundaryLoss(_Loss):
    """
    ``lambda_dice * DiceLoss + boundary_weight * BoundaryLoss``, both from MONAI, with one set of
    activation and one-hot settings so the two terms always see the same probabilities and targets.

    The boundary term (Kervadec et al., MIDL 2019) sums the predicted probabilities weighted by the
    signed distance to the ground-truth contour (negative inside, positive outside), so it is signed
    and unbounded below: the total can be negative and only its decrease is meaningful. It is unstable
    alone at the start of training, hence a small ``boundary_weight`` that is raised by epoch with
    :class:`custom_nets.handlers.boundary_weight_ramp.BoundaryWeightRamp` (or
    :func:`custom_nets.handlers.boundary_weight_ramp.boundary_weight_at` in a hand-written loop).

    Empty and full masks: a channel whose ground truth is all background or all foreground has no
    contour; MONAI's ``BoundaryLoss`` gives it a zero distance map (as the reference implementation
    does), so that channel's boundary term is exactly 0 (finite, no gradient) and Dice alone (kept
    finite by ``smooth_nr``/``smooth_dr``) drives it. Per image, Dice of an empty ground truth is ~1
    whatever the prediction, with a vanishing gradient; when many 2D slices are empty (tumours,
    nodules), ``batch=True`` pools them with the non-empty slices of the batch so false positives there
    are still penalised.

    Cost: the signed distance maps are computed from the target at every call, per image and
    channel, with SciPy on the CPU (with cuCIM on the GPU when it is installed); a weight of exactly
    0 skips them.

    Args:
        include_background: if False, channel 0 (background) is left out of both terms.
        to_onehot_y: convert a label-index ``target`` (``B1HW[D]`` or ``BHW[D]``) to one-hot with
            ``input.shape[1]`` classes, as in MONAI's losses. Leave False for targets that are already
            one-hot or multi-label (e.g. BraTS TC/WT/ET channels).
        sigmoid: multi-label mode: an independent sigmoid per channel (overlapping regions, BraTS).
        softmax: multi-class mode: a softmax over channels (mutually exclusive classes; needs at
            least 2 output channels). Exactly one of ``sigmoid`` and ``softmax`` must be True.
        lambda_dice: weight of the Dice term.
        boundary_weight: weight of the boundary term; a plain float attribute that schedules
            (e.g. ``BoundaryWeightRamp``) may change between epochs.
        batch: Dice over the whole batch instead of per image, and the boundary term averaged over
            the batch before the channel mean (MONAI's ``batch`` of both losses).
        smooth_nr: Dice numerator smoothing (keeps empty masks finite).
        smooth_dr: Dice denominator smoothing.

    Raises:
        ValueError: when not exactly one of ``sigmoid``/``softmax`` is set, or a weight is negative.

    Example::

        import torch
        from custom_nets.losses.hybrid_dice_boundary import HybridDiceBoundaryLoss

        loss_fn = HybridDiceBoundaryLoss(softmax=True, to_onehot_y=True, boundary_weight=0.01)
        logits = torch.randn(2, 3, 64, 64, requires_grad=True)
        labels = torch.randint(0, 3, (2, 1, 64, 64))
        loss = loss_fn(logits, labels)
        loss.backward()
        loss_fn.boundary_weight = 0.5  # e.g. later in training
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        lambda_dice: float = 1.0,
        boundary_weight: float = 0.01,
        batch: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if bool(sigmoid) == bool(softmax):
            raise ValueError(
                "HybridDiceBoundaryLoss needs exactly one activation: sigmoid=True (multi-label, e.g. BraTS "
                f"TC/WT/ET) or softmax=True (multi-class), got sigmoid={sigmoid}, softmax={softmax}"
            )
        if lambda_dice < 0 or boundary_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got lambda_dice={lambda_dice}, boundary_weight={boundary_weight}"
            )
        self.sigmoid = bool(sigmoid)
        self.softmax = bool(softmax)
        self.to_onehot_y = bool(to_onehot_y)
        self.lambda_dice = float(lambda_dice)
        self.boundary_weight = float(boundary_weight)
        shared = {
            "include_background": include_background,
            "to_onehot_y": to_onehot_y,
            "sigmoid": sigmoid,
            "softmax": softmax,
            "batch": batch,
        }
        self.dice = DiceLoss(smooth_nr=smooth_nr, smooth_dr=smooth_dr, **shared)
        self.boundary = BoundaryLoss(**shared)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``BNHW[D]`` (N classes or labels; the activation is applied here).
            target: one-hot / multi-label ``BNHW[D]``, or label indices ``B1HW[D]``/``BHW[D]`` with
                ``to_onehot_y=True``.

        Returns:
            the scalar loss.
        """
        if input.dim() not in (4, 5):
            raise ValueError(f"expected logits of shape BNHW or BNHWD, got shape {list(input.shape)}")
        if self.softmax and input.shape[1] < 2:
            raise ValueError(
                f"softmax=True needs at least 2 output channels, got {input.shape[1]}; "
                "use sigmoid=True for a single foreground channel"
            )
        if self.to_onehot_y and target.dim() == input.dim() - 1:
            target = target.unsqueeze(1)  # DiceLoss wants the channel axis that BoundaryLoss adds itself
        expected_channels = 1 if self.to_onehot_y and input.shape[1] > 1 else input.shape[1]
        if target.dim() != input.dim() or target.shape[1] != expected_channels or target.shape[2:] != input.shape[2:]:
            form = "label indices B1HW[D]" if expected_channels == 1 and self.to_onehot_y else "one-hot BNHW[D]"
            raise ValueError(
                f"target shape {list(target.shape)} does not fit logits {list(input.shape)} "
                f"(to_onehot_y={self.to_onehot_y}: expected {form})"
            )
        dice = self.dice(input, target)
        if self.boundary_weight == 0.0:
            return self.lambda_dice * dice  # skip the CPU distance transforms when the term is off
        return self.lambda_dice * dice + self.boundary_weight * self.boundary(input, target)
