"""Calibration from data after conversion: BatchNorm statistics and the binary inputs' thresholds."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from binarize._utils import eval_mode, run_batches
from binarize.errors import ConfigError
from binarize.nn import ReCUConv2d

__all__ = ["recalibrate_bn", "calibrate_thresholds", "relu_thresholds"]

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


def relu_thresholds(x: torch.Tensor, max_values: int = 65536) -> torch.Tensor:
    """Per channel (rows of ``x``), the threshold ``t`` maximising ``corr(relu(x), 1[x > t])``.

    The float model feeds a conv ``relu(x)``; a binary input ``sign(x - t)`` is an affine function of
    ``1[x > t]`` whose affine part the following conv and BatchNorm absorb per output channel, so the
    best threshold is the one whose indicator is most correlated with ``relu(x)`` (the least-squares
    fit of ``relu(x)`` by ``a sign(x - t) + b``). With ``x`` sorted in decreasing order and
    ``p = j / N`` the share above the cut, ``corr`` is proportional to
    ``(S_j / N - mean(relu) p) / sqrt(p (1 - p))``, ``S_j`` the sum of the ``j`` largest ``relu(x)``:
    one sort and one cumulative sum per channel give the exact maximiser over the observed values.

    Args:
        x: ``(C, N)`` samples of each channel's input.
        max_values: Keep at most this many evenly spaced samples per channel.

    Returns:
        ``(C,)`` thresholds: the midpoint between the smallest value above and the largest value
        below the best cut (0 for a channel whose values are all equal).
    """
    x = x.float()
    if x.shape[1] > max_values:
        x = x[:, :: -(-x.shape[1] // max_values)]
    n = x.shape[1]
    values = x.sort(dim=1, descending=True).values
    relu = values.clamp_min(0)
    top = relu.cumsum(dim=1)[:, :-1]  # S_j for j = 1 .. n - 1 values above the cut
    p = torch.arange(1, n, dtype=x.dtype, device=x.device) / n
    score = (top / n - relu.mean(dim=1, keepdim=True) * p) / torch.sqrt(p * (1 - p))
    # a cut between two equal values does not exist: it would not change the indicator
    score = torch.where(values[:, :-1] > values[:, 1:], score, torch.full_like(score, -float("inf")))
    j = score.argmax(dim=1, keepdim=True)
    t = (values.gather(1, j) + values.gather(1, j + 1)) / 2
    constant = torch.isinf(score.gather(1, j))
    return torch.where(constant, torch.zeros_like(t), t).squeeze(1)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches: Iterable, max_batches: int = 8) -> dict[str, torch.Tensor]:
    """Sets each binary conv's activation bias so that its input signs best stand for the float ReLU.

    Every :class:`~binarize.nn.ReCUConv2d` converted with ``LayerOptions(activation_bias=True)``
    binarizes ``sign(x + beta)``; this sets ``beta = -t*`` per input channel, ``t*`` from
    :func:`relu_thresholds` on the layer's inputs. The inputs are collected in eval mode, so
    re-estimate the BatchNorm statistics first (:func:`recalibrate_bn`), and again afterwards: the
    binary outputs change. The model's mode is restored.

    Args:
        model: The converted model (modified in place).
        batches: An iterable of input tensors or ``(inputs, targets, ...)`` tuples.
        max_batches: Stop after this many batches.

    Returns:
        The thresholds set, by layer name (empty when no layer has an activation bias).

    Raises:
        ConfigError: Layers have an activation bias but no batch arrived.

    Example::

        >>> binary = binarize.convert(float_model, layer=binarize.LayerOptions(activation_bias=True))
        >>> binarize.recalibrate_bn(binary, loader, max_batches=50)
        >>> binarize.calibrate_thresholds(binary, loader)
        >>> binarize.recalibrate_bn(binary, loader, max_batches=50)
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ReCUConv2d) and m.activation_bias is not None}
    if not layers:
        return {}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str, module: nn.Module, args: tuple) -> None:
        seen[name].append(args[0].detach().float().transpose(0, 1).flatten(1))

    if not run_batches(model, batches, max_batches, layers.items(), keep):
        raise ConfigError("calibrate_thresholds: no batches (the iterable is empty or already consumed)")
    found = {}
    for name, layer in layers.items():
        if seen[name]:
            t = relu_thresholds(torch.cat(seen[name], dim=1))
            layer.activation_bias.copy_((-t).to(layer.activation_bias))
            found[name] = t
    return found
