"""Plain-autograd float64 reference of a ReCU binary convolution, written from the spec.

The reference follows ReCU (Xu et al., "ReCU: Reviving the Dead Weights in Binary Neural Networks", ICCV 2021)
as specified for binarize, and is deliberately independent of ``binarize.nn``: it uses only ordinary
differentiable torch ops, so autograd derives every gradient. Straight-through estimators are written as
``hard.detach() + (soft - soft.detach())``, whose forward value is exactly ``hard`` and whose gradient is
exactly the gradient of ``soft``.

Weights, per output channel ``o`` (``n = I/groups * kh * kw`` entries):
``W0 = W - mean_o(W)``, ``W1 = W0 * 2*sqrt(2) / sqrt(unbiased_var_o(W0) + 1e-5)``,
``Q = -mean(|W1|) * ln(2 - 2*tau)`` over the whole tensor (detached), forward ``sign(W1)``, backward through
``clamp(W1, -Q, Q)`` (gradient kept where ``|W1| <= Q``).

Activations: ``A0 = A / sqrt(unbiased_var_sample(A) + 1e-5)`` in training (the variance is centred and is not
detached), ``A0 = A`` in eval; forward ``sign(A0)``, backward ``max(0, 2 - 2|A0|)``.

Output: ``alpha_o * conv2d(sign(A0), sign(W1)) + bias_o``, zero padding applied after the sign.
Here ``sign(0) = sign(-0.0) = +1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EPS",
    "WEIGHT_SCALE",
    "RefStats",
    "approx_sign_ste",
    "reference_conv",
    "sign_pm1",
    "standardize_activation",
    "standardize_weight",
    "threshold",
    "weight_ste",
]

EPS = 1e-5
WEIGHT_SCALE = 2.0 * math.sqrt(2.0)


def sign_pm1(x: Tensor) -> Tensor:
    """Sign with ``sign(0) = sign(-0.0) = +1``.

    Args:
        x: Any floating tensor.

    Returns:
        A tensor of the same dtype holding only ``+1`` and ``-1``.
    """
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def standardize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and rescale a conv weight per output channel.

    Args:
        weight: Latent weight of shape ``(O, I/groups, kh, kw)``.

    Returns:
        ``(W1, sigma)`` where ``W1 = (W - mean_o) * 2*sqrt(2) / sigma`` and ``sigma = sqrt(var_o + 1e-5)``
        (shape ``(O, 1, 1, 1)``), both differentiable.
    """
    dims = tuple(range(1, weight.dim()))
    centred = weight - weight.mean(dim=dims, keepdim=True)
    sigma = torch.sqrt(centred.var(dim=dims, keepdim=True, correction=1) + EPS)
    return centred * WEIGHT_SCALE / sigma, sigma


def threshold(w1: Tensor, tau: float | Tensor) -> Tensor:
    """Detached layer-wise ReCU threshold ``Q = -mean(|W1|) * ln(2 - 2*tau)``.

    Args:
        w1: Standardized weight.
        tau: Quantile in ``[0.5, 1]``; ``tau = 1`` gives ``Q = inf``.

    Returns:
        A 0-dim tensor in the dtype of ``w1``.
    """
    tau_t = torch.as_tensor(tau, dtype=torch.float64).to(w1.dtype)
    return (-w1.detach().abs().mean() * torch.log(2.0 - 2.0 * tau_t)).detach()


def weight_ste(w1: Tensor, q: Tensor) -> Tensor:
    """Binary weight ``sign(W1)`` whose gradient is that of ``clamp(W1, -Q, Q)``.

    Args:
        w1: Standardized weight.
        q: Threshold from :func:`threshold`.

    Returns:
        A ``±1`` tensor with the ReCU gradient.
    """
    clamped = torch.clamp(w1, -q, q)
    return sign_pm1(w1).detach() + (clamped - clamped.detach())


def _approx_sign(x: Tensor) -> Tensor:
    """Bi-Real ApproxSign written so that autograd gives exactly ``max(0, 2 - 2|x|)``."""
    c = torch.clamp(x, -1.0, 1.0)
    return 2.0 * c - c * c.abs()


def approx_sign_ste(a0: Tensor) -> Tensor:
    """Binary activation ``sign(A0)`` with the ApproxSign gradient window ``max(0, 2 - 2|A0|)``.

    Args:
        a0: Standardized activation.

    Returns:
        A ``±1`` tensor with the surrogate gradient.
    """
    soft = _approx_sign(a0)
    return sign_pm1(a0).detach() + (soft - soft.detach())


def standardize_activation(x: Tensor, training: bool) -> Tensor:
    """Per-sample activation scaling (training only), not detached.

    Args:
        x: Input of shape ``(N, C, H, W)``.
        training: Train-mode flag; eval returns ``x`` unchanged.

    Returns:
        ``x / sqrt(unbiased_var_sample(x) + 1e-5)`` in training, else ``x``.
    """
    if not training:
        return x
    var = x.var(dim=(1, 2, 3), keepdim=True, correction=1)
    return x / torch.sqrt(var + EPS)


@dataclass
class RefStats:
    """Intermediate quantities of one reference forward.

    Attributes:
        w1: Standardized weight (detached).
        sigma: Per-channel ``sqrt(var + eps)`` of the centred weight (detached).
        q: Threshold ``Q`` (0-dim).
        binary_weight: ``sign(W1)`` (detached).
        binary_input: ``sign(A0)`` before padding (detached).
        a0: Standardized activation (detached).
    """

    w1: Tensor
    sigma: Tensor
    q: Tensor
    binary_weight: Tensor
    binary_input: Tensor
    a0: Tensor


def reference_conv(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor | None,
    bias: Tensor | None,
    tau: float | Tensor,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    training: bool = True,
    binarize_weights: bool = True,
) -> tuple[Tensor, RefStats]:
    """ReCU convolution in plain autograd.

    Args:
        x: Input ``(N, C, H, W)``.
        weight: Latent weight ``(O, C/groups, kh, kw)``.
        alpha: Per-channel scale ``(O,)``; ignored when ``binarize_weights`` is False.
        bias: Optional bias ``(O,)``, added after the scale.
        tau: ReCU quantile.
        stride: Conv stride.
        padding: Conv padding (an int or a pair); zero padding is applied after the sign.
        dilation: Conv dilation.
        groups: Conv groups.
        padding_mode: ``"zeros"`` or an ``F.pad`` mode (``"reflect"``, ``"replicate"``, ``"circular"``),
            applied to the binarized input as ``nn.Conv2d`` does.
        training: Whether activations are standardized.
        binarize_weights: If False the latent weight is used as is and ``alpha`` is not applied.

    Returns:
        ``(output, stats)``.
    """
    a0 = standardize_activation(x, training)
    xb = approx_sign_ste(a0)
    if padding_mode != "zeros":
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        xb_in = F.pad(xb, (pw, pw, ph, ph), mode=padding_mode)
        conv_padding: int | tuple[int, int] = 0
    else:
        xb_in = xb
        conv_padding = padding
    w1, sigma = standardize_weight(weight)
    q = threshold(w1, tau)
    if binarize_weights:
        wb = weight_ste(w1, q)
    else:
        wb = weight
    out = F.conv2d(xb_in, wb, None, stride, conv_padding, dilation, groups)
    if binarize_weights:
        assert alpha is not None
        out = out * alpha.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    stats = RefStats(
        w1=w1.detach(),
        sigma=sigma.detach(),
        q=q,
        binary_weight=sign_pm1(w1).detach(),
        binary_input=sign_pm1(a0).detach(),
        a0=a0.detach(),
    )
    return out, stats
