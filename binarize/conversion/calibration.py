"""Re-estimating BatchNorm statistics after conversion."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from binarize._utils import eval_mode
from binarize.errors import ConfigError

__all__ = ["recalibrate_bn"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> nn.Module:
    """Re-estimates every BatchNorm's running statistics from data, in place.

    Binarizing changes the distribution of every binary conv's output, so the float model's running
    statistics no longer fit; evaluate a freshly converted model only after this. The statistics are
    reset and re-accumulated as an exact average over the batches; nothing else is trained, dropout
    stays off, and the model's train/eval mode is restored.

    If no batch arrives (an empty iterable, or a generator already consumed by an earlier call) or the
    model fails on a batch, the statistics are restored as they were and the error is raised: resetting
    them without data would leave every BatchNorm at mean 0, variance 1.

    Args:
        model: The model (modified in place).
        batches: An iterable of input tensors, or of ``(inputs, targets, ...)`` tuples or lists: a list,
            a DataLoader, or a fresh generator (a generator is consumed: make a new one for each call).
        max_batches: Stop after this many batches (at least 1; None: all).

    Returns:
        The model.

    Raises:
        ConfigError: No batch arrived, ``batches`` is one tensor, or ``max_batches`` is below 1.
    """
    if isinstance(batches, torch.Tensor):
        raise ConfigError("recalibrate_bn takes an iterable of batches, got one tensor; pass [batch]")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"recalibrate_bn: max_batches must be >= 1 (None: all batches), got {max_batches}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    saved = [{k: getattr(m, k).clone() for k in _STATS} for m in norms]
    momenta = [m.momentum for m in norms]
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    seen = 0
    with eval_mode(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.training = True  # only the norm itself: its children (timm's fused act, drop) stay in eval
        try:
            for batch in itertools.islice(batches, max_batches):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device, non_blocking=True))
                seen += 1
            if not seen:
                raise ConfigError(
                    "recalibrate_bn: no batches (the iterable is empty or already consumed); pass a list or a "
                    "fresh iterable"
                )
        except BaseException:
            for m, stats in zip(norms, saved, strict=True):
                for key, value in stats.items():
                    getattr(m, key).copy_(value)
            raise
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
    return model
