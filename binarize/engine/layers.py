"""Switches on the binary layers of a model that training changes: ReCU's tau and weight binarization."""

from __future__ import annotations

import dataclasses

from torch import nn

from binarize.conversion.record import binarize_meta, set_record
from binarize.engine.tau_scheduler import TauScheduler
from binarize.nn import ReCUConv2d
from binarize.recipes import MethodConfig

__all__ = ["set_tau", "set_weight_binarization", "stage_tau_scheduler"]


def set_tau(model: nn.Module, tau: float) -> None:
    """Sets tau of every ReCU layer in place (no reallocation, no host sync)."""
    for module in model.modules():
        if isinstance(module, ReCUConv2d):
            module.tau.fill_(tau)


def set_weight_binarization(model: nn.Module, enabled: bool) -> None:
    """Switches every ReCU layer between binary and float weights (activations stay binary).

    Turning weight binarization on re-initialises each layer's scale from its current weights, as
    the second stage of two-stage training starts from the first stage's float weights. With float
    weights the scale is unused, so it is frozen (DistributedDataParallel rejects parameters that
    get no gradient).
    """
    for module in model.modules():
        if isinstance(module, ReCUConv2d):
            if module.binarize_weights != enabled:
                module.binarize_weights = enabled
                if enabled:
                    module.reset_alpha()
            module.alpha.requires_grad_(enabled)
    record = binarize_meta(model)
    if record is not None:
        set_record(model, dataclasses.replace(record, layer=record.layer.replace(binarize_weights=enabled)))


def stage_tau_scheduler(
    model: nn.Module, method: MethodConfig, epochs: int, steps_per_epoch: int, start_epoch: int, step: int
) -> TauScheduler | None:
    """A stage's tau schedule (ReCU eq. 24), at the position the stage starts or resumes from: epoch
    ``start_epoch``, or optimizer step ``step`` of the stage when tau moves every step. None for a model
    without ReCU layers."""
    if not any(isinstance(m, ReCUConv2d) for m in model.modules()):
        return None
    per_step = method.granularity == "step"
    scheduler = TauScheduler(
        model,
        epochs,
        tau_min=method.tau_min,
        tau_max=method.tau_max,
        per_step=per_step,
        steps_per_epoch=steps_per_epoch if per_step else None,
    )
    scheduler.load_state_dict({**scheduler.state_dict(), "count": step if per_step else start_epoch})
    return scheduler
