"""Switches on the binary layers of a model that training changes: ReCU's tau and weight binarization."""

from __future__ import annotations

import dataclasses

from torch import nn

from binarize.conversion.record import binarize_meta, set_record
from binarize.nn import ReCUConv2d

__all__ = ["set_tau", "set_weight_binarization"]


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
