"""Activation saturation: the share of pre-sign inputs outside the gradient window of the sign.

A binary layer's input ``x`` gets the gradient of Bi-Real Net's ApproxSign, ``max(0, 2 - 2|A0|)``, with
``A0 = (x + beta) / sqrt(var + 1e-5)`` in training: ``var`` is the unbiased variance of each sample over
``(C, H, W)`` and ``beta`` the learnable threshold when the layer has one (see
:mod:`binarize.nn.functional`). An input with ``|A0| >= 1`` gets no gradient: ``saturation`` is the
share of such inputs, measured with forward pre-hooks on a few batches, the model in eval mode (its
BatchNorm running statistics, no dropout) and without gradients. Modes are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from binarize._utils import run_batches, unwrap
from binarize.diagnostics.figures import binary_layers
from binarize.nn import ReCUConv2d
from binarize.nn.functional import EPS, _stats_dtype

__all__ = ["measure_saturation"]


def _saturated(layer: ReCUConv2d, x: Tensor) -> Tensor:
    """Count of ``|A0| >= 1`` in one input batch, as the training forward standardises it."""
    x = _stats_dtype(x)
    if layer.activation_bias is not None:
        x = x + layer.activation_bias.to(x.dtype).view(1, -1, 1, 1)
    dims = (1, 2, 3)
    centred = x - x.mean(dim=dims, keepdim=True)
    var = centred.square().sum(dim=dims, keepdim=True) / max(x[0].numel() - 1, 1)
    return (x.abs() * torch.rsqrt(var + EPS) >= 1.0).sum()


@torch.no_grad()
def measure_saturation(model: nn.Module, batches: Iterable, max_batches: int = 4) -> dict[str, float | None]:
    """The saturation of every binary layer over the first ``max_batches`` batches.

    Args:
        model: The model (DDP and ``torch.compile`` wrappers are unwrapped; the plain module runs).
        batches: Input tensors, or ``(inputs, targets, ...)`` tuples or lists.
        max_batches: How many batches to read at most.

    Returns:
        Layer name -> share of inputs with ``|A0| >= 1``; None for a layer the batches never reached.
    """
    model = unwrap(model)
    layers = binary_layers(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    counts = {name: [torch.zeros((), dtype=torch.int64, device=device), 0] for name, _ in layers}

    def count(name: str, module: ReCUConv2d, args: tuple) -> None:
        x = args[0]
        counts[name][0] += _saturated(module, x).to(device)
        counts[name][1] += x.numel()

    run_batches(model, batches, max_batches, layers, count)
    totals = torch.stack([c[0] for c in counts.values()]).tolist() if counts else []
    return {
        name: (saturated / seen if seen else None)
        for (name, (_, seen)), saturated in zip(counts.items(), totals, strict=True)
    }
