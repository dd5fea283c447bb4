"""The weight figures of one binary layer: clipped share, quantization error, sign entropy, shape.

Every figure is computed in float64 from the latent weights with the layer's own formulas
(:func:`binarize.nn.functional._centred_stats` and :func:`~binarize.nn.functional.recu_threshold`,
the code the forward pass runs), under ``torch.no_grad``; nothing here runs inside a training step.
With ``W1 = (W - mean_o) * 2*sqrt(2) / sqrt(var_o + 1e-5)`` the standardised centred latent weights
(ReCU eq. 22 with ``b* = 2``) and ``Q(tau) = -b ln(2 - 2 tau)``, ``b = mean|W1|`` (eq. 10-11):

* ``clipped = mean 1[|W1| > Q(tau)]``: the share outside the ReCU clamp ``[Q(1-tau), Q(tau)]``
  (eq. 8), the weights that get no task gradient, the paper's dead weights; for Laplace-shaped
  weights it is ``clipped_nominal = 2 (1 - tau)``;
* ``quant_error = ||W1 - a sign(W1)||^2 / ||W1||^2`` with the L1-optimal per-output-channel scale
  ``a_o = mean|W1_o|`` (normalised eq. 4): 0.5 for Laplace, ``1 - 2/pi = 0.363`` for Gaussian weights;
* ``entropy``: the binary entropy (bits) of the share of +1 among each output channel's sign bits,
  averaged over the output channels: 1 for balanced signs, 0 for a channel of one sign only;
* ``weight_shape = std(W1) / mean|W1|`` over the layer: ``sqrt(2) = 1.41`` for Laplace,
  ``sqrt(pi/2) = 1.25`` for Gaussian weights (the threshold assumes Laplace).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from binarize._utils import unwrap
from binarize.nn import ReCUConv2d
from binarize.nn.functional import _centred_stats, recu_threshold

__all__ = ["WeightFigures", "binary_layers", "standardized_weights", "weight_figures"]


@dataclasses.dataclass(frozen=True)
class WeightFigures:
    """The figures of one layer that its weights alone give (see the module docstring)."""

    tau: float
    clipped: float
    clipped_nominal: float
    quant_error: float
    entropy: float
    weight_shape: float


def binary_layers(model: nn.Module) -> list[tuple[str, ReCUConv2d]]:
    """The ``ReCUConv2d`` layers with binary weights, by qualified name (DDP and compile wrappers unwrapped)."""
    return [
        (name, module)
        for name, module in unwrap(model).named_modules()
        if isinstance(module, ReCUConv2d) and module.binarize_weights
    ]


@torch.no_grad()
def standardized_weights(layer: ReCUConv2d) -> tuple[Tensor, Tensor]:
    """``W1`` and ``Q(tau)`` of a layer in float64, by the layer's own formulas.

    Returns:
        The standardised centred latent weights (shaped like ``layer.weight``) and the 0-dim threshold.
    """
    w = layer.weight.detach().to(torch.float64)
    _, centred, scale = _centred_stats(w)
    threshold = recu_threshold(centred, scale, layer.tau)
    return centred.mul_(scale), threshold


def _binary_entropy(p: Tensor) -> Tensor:
    """``-p log2 p - (1 - p) log2 (1 - p)`` with ``0 log 0 = 0``."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2.0)


@torch.no_grad()
def weight_figures(layer: ReCUConv2d) -> WeightFigures:
    """The weight figures of one binary layer (one host synchronisation)."""
    w1, threshold = standardized_weights(layer)
    flat = w1.flatten(1)
    magnitude = flat.abs()
    bits = layer.sign_bits().flatten(1).to(torch.float64)  # the deployed signs: +1 where W - mean_o >= 0
    signs = bits.mul(2.0).sub_(1.0)
    scale = magnitude.mean(dim=1, keepdim=True)  # a_o = mean|W1_o|, the L1-optimal scale of sign(W1)
    tau = layer.tau.to(torch.float64)
    figures = torch.stack(
        [
            tau,
            (magnitude > threshold).to(torch.float64).mean(),
            2.0 * (1.0 - tau),
            (flat - scale * signs).square().sum() / flat.square().sum(),
            _binary_entropy(bits.mean(dim=1)).mean(),
            flat.std(correction=0) / magnitude.mean(),
        ]
    ).tolist()
    return WeightFigures(*figures)
