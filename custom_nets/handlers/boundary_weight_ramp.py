"""Epoch-wise linear ramp of the boundary-loss weight (docs/design.md, "Loss"): an Ignite handler and a pure function."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["BoundaryWeightRamp", "boundary_weight_at"]


def boundary_weight_at(epoch: int, max_weight: float = 1.0, ramp_epochs: int = 50, start_weight: float = 0.01) -> float:
    """
    The boundary-loss weight for a 1-based ``epoch``: ``start_weight`` at epoch 1, then a linear step of
    ``(max_weight - start_weight) / ramp_epochs`` per epoch, reaching ``max_weight`` at epoch
    ``ramp_epochs + 1`` and staying there. ``ramp_epochs=0`` gives ``max_weight`` from the start.

    This is the whole schedule: the weight depends on the epoch number only, so a resumed run gets
    the same weight as an uninterrupted one. Use it directly in a hand-written loop::

        for epoch in range(1, max_epochs + 1):
            loss_fn.boundary_weight = boundary_weight_at(epoch, max_weight=1.0, ramp_epochs=50)
            ...

    Args:
        epoch: 1-based epoch number (Ignite's ``engine.state.epoch`` at ``EPOCH_STARTED``); values
            below 1 are treated as 1.
        max_weight: weight once the ramp is over.
        ramp_epochs: epochs the ramp lasts (>= 0).
        start_weight: weight at the first epoch.

    Example::

        boundary_weight_at(1, max_weight=1.0, ramp_epochs=4, start_weight=0.0)  # 0.0
        boundary_weight_at(3, max_weight=1.0, ramp_epochs=4, start_weight=0.0)  # 0.5
        boundary_weight_at(9, max_weight=1.0, ramp_epochs=4, start_weight=0.0)  # 1.0
    """
    if ramp_epochs < 0:
        raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
    if ramp_epochs == 0:
        return float(max_weight)
    progress = min(max(epoch - 1, 0) / ramp_epochs, 1.0)
    return float(start_weight + (max_weight - start_weight) * progress)


class BoundaryWeightRamp:
    """
    Ignite handler that sets ``loss.boundary_weight`` at every ``EPOCH_STARTED`` from
    :func:`boundary_weight_at` and ``engine.state.epoch``, so it is resume-safe (a checkpoint restores
    the epoch, and with it the weight). The value is also written to ``engine.state.boundary_weight``,
    so MONAI's ``MLFlowHandler(state_attributes=["boundary_weight"])`` can log it.

    In a bundle's ``train#handlers`` list (MONAI handler convention, ``attach(engine)``)::

        {"_target_": "custom_nets.handlers.boundary_weight_ramp.BoundaryWeightRamp",
         "loss": "@loss", "max_weight": 1.0, "ramp_epochs": 50, "start_weight": 0.01}

    Args:
        loss: the loss object used by the trainer, with a float attribute ``boundary_weight``
            (e.g. :class:`custom_nets.losses.hybrid_dice_boundary.HybridDiceBoundaryLoss`).
        max_weight: weight once the ramp is over.
        ramp_epochs: epochs the ramp lasts (see :func:`boundary_weight_at`).
        start_weight: weight at epoch 1.
        name: logger name; ``None`` uses ``engine.logger``.

    Raises:
        TypeError: when ``loss`` has no ``boundary_weight`` attribute.
        ValueError: negative weights or ``ramp_epochs``.

    Example::

        from ignite.engine import Engine
        from custom_nets.handlers.boundary_weight_ramp import BoundaryWeightRamp
        from custom_nets.losses.hybrid_dice_boundary import HybridDiceBoundaryLoss

        loss = HybridDiceBoundaryLoss(softmax=True, to_onehot_y=True)
        trainer = Engine(lambda engine, batch: None)
        BoundaryWeightRamp(loss, max_weight=1.0, ramp_epochs=50).attach(trainer)
    """

    def __init__(
        self,
        loss: Any,
        max_weight: float = 1.0,
        ramp_epochs: int = 50,
        start_weight: float = 0.01,
        name: str | None = None,
    ) -> None:
        if not hasattr(loss, "boundary_weight"):
            raise TypeError(f"{type(loss).__name__} has no attribute 'boundary_weight' for BoundaryWeightRamp to set")
        if max_weight < 0 or start_weight < 0:
            raise ValueError(f"weights must be >= 0, got start_weight={start_weight}, max_weight={max_weight}")
        if ramp_epochs < 0:
            raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
        self.loss = loss
        self.max_weight = float(max_weight)
        self.ramp_epochs = int(ramp_epochs)
        self.start_weight = float(start_weight)
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the Ignite trainer whose epochs drive the ramp.
        """
        if self._name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: the Ignite trainer; reads ``engine.state.epoch``.
        """
        weight = boundary_weight_at(engine.state.epoch, self.max_weight, self.ramp_epochs, self.start_weight)
        self.loss.boundary_weight = weight
        engine.state.boundary_weight = weight
        self.logger.debug(f"epoch {engine.state.epoch}: boundary loss weight {weight:.4g}")
