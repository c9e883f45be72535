"""Class-weighted cross-entropy for the shallow SegNet recipe (seed 002), and the class weights it uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["WeightedCrossEntropyLoss", "class_frequency_weights"]

FREQUENCY_METHODS = ("median", "inverse")


def class_frequency_weights(
    label_maps: Iterable[np.ndarray | torch.Tensor],
    num_classes: int,
    method: str = "median",
    ignore_index: int | None = None,
) -> list[float]:
    """
    Class weights from the pixel frequencies of label maps, for :class:`WeightedCrossEntropyLoss`.

    - ``"median"``: median-frequency balancing (Eigen & Fergus 2015, used by SegNet):
      ``freq(c) = pixels of c / pixels of the images in which c is present`` and
      ``weight(c) = median(freq) / freq(c)``.
    - ``"inverse"``: inverse frequency normalised like scikit-learn's ``"balanced"``:
      ``weight(c) = total pixels / (num_classes * pixels of c)`` (1.0 for every class when balanced).

    Args:
        label_maps: label-index maps, one per image (or per volume), any shape (a leading channel of
            1 is fine); a generator works, so files can be streamed. Integer values in
            ``[0, num_classes)``.
        num_classes: number of classes (the network's ``out_channels``).
        method: ``"median"`` or ``"inverse"``.
        ignore_index: a label value to leave out of the counts (e.g. 255 for "unlabelled").

    Returns:
        one weight per class, as plain floats (JSON-friendly for bundle configs).

    Raises:
        ValueError: unknown ``method``, no label maps, a label outside ``[0, num_classes)``, a
            non-integer label, or a class that never occurs (its weight would be undefined; check
            ``num_classes`` or the label convention).

    Example::

        import numpy as np
        from custom_nets.losses.weighted_cross_entropy import class_frequency_weights

        labels = [np.array([[0, 0, 0, 1]]), np.array([[0, 0, 1, 1]])]
        class_frequency_weights(labels, num_classes=2, method="inverse")  # [0.8, 1.333...]
    """
    if method not in FREQUENCY_METHODS:
        raise ValueError(f"method must be one of {FREQUENCY_METHODS}, got {method!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    present_image_pixels = np.zeros(num_classes, dtype=np.int64)  # sum of image sizes where the class occurs
    n_maps = 0
    for index, label_map in enumerate(label_maps):
        labels = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
        if labels.size and not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"label map {index} holds non-integer values; expected class indices")
        labels = labels.astype(np.int64).ravel()
        if ignore_index is not None:
            labels = labels[labels != ignore_index]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"label map {index} holds values in [{labels.min()}, {labels.max()}], "
                f"outside [0, {num_classes}) for num_classes={num_classes}"
            )
        counts = np.bincount(labels, minlength=num_classes)
        class_pixels += counts
        present_image_pixels += (counts > 0) * labels.size
        n_maps += 1
    if n_maps == 0:
        raise ValueError("no label maps given to compute class weights from")
    absent = [c for c in range(num_classes) if class_pixels[c] == 0]
    if absent:
        raise ValueError(f"class(es) {absent} never occur in the {n_maps} label map(s); their weight is undefined")
    if method == "median":
        frequency = class_pixels / present_image_pixels
        weights = np.median(frequency) / frequency
    else:
        weights = class_pixels.sum() / (num_classes * class_pixels)
    return [float(w) for w in weights]


class WeightedCrossEntropyLoss(_Loss):
    """
    Cross-entropy with one weight per class (``torch.nn.functional.cross_entropy``'s ``weight``), taking
    targets the way MONAI's ``DiceCELoss`` does: label indices ``B1HW[D]`` (or ``BHW[D]``), or one-hot /
    soft labels ``BNHW[D]`` with one channel per class. The weights are a buffer, so they follow
    ``.to(device)``.

    Args:
        class_weights: one non-negative weight per class, e.g. from :func:`class_frequency_weights`;
            ``None`` for plain (unweighted) cross-entropy.
        ignore_index: label index that contributes nothing (index targets only).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, with PyTorch's semantics: for index targets
            ``"mean"`` divides by the summed weights of the target pixels (a weighted mean), for
            one-hot / soft targets by the pixel count, so the two target forms give different values.
        label_smoothing: PyTorch's label smoothing in ``[0, 1)``.

    Raises:
        ValueError: negative or non-1D ``class_weights``; in ``forward``, a weight count that differs
            from the logits' channels, a target that does not fit the logits, or a label out of range.

    Example::

        import torch
        from custom_nets.losses.weighted_cross_entropy import WeightedCrossEntropyLoss

        loss_fn = WeightedCrossEntropyLoss(class_weights=[0.2, 1.8])
        logits = torch.randn(2, 2, 64, 64)
        labels = torch.randint(0, 2, (2, 1, 64, 64))
        loss = loss_fn(logits, labels)
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if weights.dim() != 1 or weights.numel() < 2:
                raise ValueError(f"class_weights must be one weight per class (>= 2), got shape {list(weights.shape)}")
            if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
                raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
        self.register_buffer("class_weights", weights)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``BNHW[D]``, N >= 2 classes.
            target: label indices ``B1HW[D]``/``BHW[D]``, or one-hot / soft labels ``BNHW[D]``.
        """
        n_classes = input.shape[1] if input.dim() >= 2 else 0
        if input.dim() < 3 or n_classes < 2:
            raise ValueError(f"expected logits BNHW[D] with N >= 2 classes, got shape {list(input.shape)}")
        weight = self.class_weights
        if weight is not None:
            if weight.numel() != n_classes:
                raise ValueError(f"{weight.numel()} class weights for logits with {n_classes} channels")
            weight = weight.to(device=input.device, dtype=input.dtype)
        if target.dim() == input.dim() and target.shape[1] == 1 and n_classes > 1:
            target = target[:, 0]
        if target.dim() == input.dim() - 1:  # label indices
            if target.shape[1:] != input.shape[2:] or target.shape[0] != input.shape[0]:
                raise ValueError(f"label target {list(target.shape)} does not fit logits {list(input.shape)}")
            target = target.long()
            valid = target[target != self.ignore_index]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_classes):
                raise ValueError(
                    f"labels in [{int(valid.min())}, {int(valid.max())}] are outside [0, {n_classes}) "
                    f"for logits with {n_classes} channels"
                )
        elif target.shape == input.shape:  # one-hot or soft labels
            target = target.to(dtype=input.dtype)
        else:
            raise ValueError(
                f"target {list(target.shape)} does not fit logits {list(input.shape)}: expected label indices "
                "B1HW[D] / BHW[D] or one-hot BNHW[D]"
            )
        return F.cross_entropy(
            input,
            target,
            weight=weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
