"""The ReCU binarization as functions with hand-written gradients.

Xu et al., "ReCU: Reviving the Dead Weights in Binary Neural Networks", ICCV 2021 (arXiv 2103.12369),
section 3 and the official code (z-hXu/ReCU, ``BinarizeConv2d``). The formulas are listed in
``docs/layer.md``; in short, for a convolution with latent weights ``W`` (``O x n`` after flattening
each output channel) and input activations ``A``:

* weights: ``W1 = (W - mean_o) * 2*sqrt(2) / sqrt(var_o + 1e-5)`` (unbiased variance per output
  channel), layer threshold ``Q = -mean(|W1|) * ln(2 - 2*tau)`` (detached), forward ``sign(W1)``,
  backward the upstream gradient masked by ``|W1| <= Q`` (the ReCU clamp) and then taken exactly
  through the standardisation;
* activations: forward ``sign(A)``; backward the window ``max(0, 2 - 2|A0|)`` of Bi-Real Net's
  ApproxSign, where in training ``A0 = A / sqrt(var_n + 1e-5)`` with the unbiased variance of each
  sample over ``(C, H, W)`` and the gradient also flows through that variance;
* ``sign(0) = +1``, so a binary tensor never holds a 0.

Two autograd Functions keep the work and the memory small: :func:`recu_weight` returns the binary
weight already multiplied by the per-channel scale ``alpha`` (so the scale costs a weight-sized
multiply, not an activation-sized one) and saves only per-channel statistics; :func:`sign_conv2d`
binarizes the input inside the convolution and saves the real-valued input instead of a float
copy of its sign, which it recomputes in the backward pass. Neither reads a value back to the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["WEIGHT_SCALE", "EPS", "binary_sign", "recu_threshold", "recu_weight", "sign_conv2d"]

WEIGHT_SCALE = 2.0 * math.sqrt(2.0)
"""Target standard deviation of the standardised weights: a Laplace scale b* = 2 (ReCU section 3.3)."""

EPS = 1e-5
"""Added to every variance before its square root, as in the official code."""


def _stats_dtype(t: Tensor) -> Tensor:
    """Returns ``t`` in a dtype fit for statistics: half precision is upcast to float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def binary_sign(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Sign with ``sign(0) = +1``: every element becomes exactly +1 or -1.

    Args:
        x: Any real tensor.
        dtype: Dtype of the result; that of ``x`` when omitted.

    Example::

        >>> binary_sign(torch.tensor([2.1, -0.3, 0.0, -0.0]))
        tensor([ 1., -1.,  1.,  1.])
    """
    one = torch.ones((), dtype=dtype or x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def _channel_stats(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel mean and ``c / sqrt(var + eps)`` (unbiased variance), shaped ``(O, 1, ..., 1)``."""
    dims = tuple(range(1, w.dim()))
    n = w[0].numel()
    var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=1 if n > 1 else 0)
    return mean, WEIGHT_SCALE * torch.rsqrt(var + EPS)


def recu_threshold(centred: Tensor, scale: Tensor, tau: Tensor) -> Tensor:
    """The ReCU threshold ``Q(tau) = -b * ln(2 - 2 tau)``, the tau-quantile of Laplace(0, b).

    ``b = mean(|W1|)`` over the whole layer is the maximum-likelihood Laplace scale of the
    standardised weights ``W1 = centred * scale`` (ReCU eq. 6-8). ``tau = 1`` gives ``Q = inf``.

    Args:
        centred: Weights minus their per-channel mean.
        scale: Per-channel standardisation factor, broadcastable to ``centred``.
        tau: 0-dim tensor, the quantile in ``[0.5, 1]``.
    """
    dims = tuple(range(1, centred.dim()))
    laplace_b = (centred.abs().mean(dim=dims, keepdim=True) * scale).mean()
    return -laplace_b * torch.log(2.0 - 2.0 * tau.to(laplace_b.dtype))


class _ReCUWeight(torch.autograd.Function):
    """Binary weight ``alpha_o * sign(W - mean_o)`` with ReCU's masked straight-through gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, alpha: Tensor, tau: Tensor) -> Tensor:
        w = _stats_dtype(weight)
        mean, scale = _channel_stats(w)
        centred = w - mean
        threshold = recu_threshold(centred, scale, tau)
        a = alpha.reshape((-1,) + (1,) * (w.dim() - 1)).to(weight.dtype)
        ctx.save_for_backward(weight, alpha, mean, scale, threshold)
        return torch.where(centred >= 0, a, -a)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, alpha, mean, scale, threshold = ctx.saved_tensors
        w = _stats_dtype(weight)
        g = grad.to(w.dtype)
        dims = tuple(range(1, w.dim()))
        n = w[0].numel()
        y = torch.addcmul(-mean * scale, w, scale)  # W1, the standardised weights
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = torch.where(y >= 0, g, -g).sum(dim=dims).to(alpha.dtype)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            a = alpha.reshape((-1,) + (1,) * (w.dim() - 1)).to(w.dtype)
            g_y = (g * a).masked_fill_(y.abs() > threshold, 0.0)  # the ReCU clamp passes |W1| <= Q
            # Exact gradient of W1 = c (w - mean) / sqrt(var + eps) with the unbiased variance:
            # dL/dw = (c / sigma) [g_y - mean(g_y) - W1 * sum(g_y W1) / ((n - 1) c^2)]
            sum_g = g_y.sum(dim=dims, keepdim=True)
            sum_gy = (g_y * y).sum(dim=dims, keepdim=True)
            grad_weight = torch.addcmul(-scale * sum_g / n, g_y, scale)
            grad_weight.addcmul_(y, -scale * sum_gy / (max(n - 1, 1) * WEIGHT_SCALE**2))
            grad_weight = grad_weight.to(weight.dtype)
        return grad_weight, grad_alpha, None


def recu_weight(weight: Tensor, alpha: Tensor, tau: Tensor) -> Tensor:
    """ReCU binary weight, scaled per output channel.

    Forward: ``alpha_o * sign(W - mean_o)`` (ReCU's ``sign(clamp(W1, -Q, Q))`` equals the sign of the
    centred weight). Backward: ``dL/dalpha_o = sum(g * sign)``; the gradient of ``W`` is ``g * alpha``
    masked by ``|W1| <= Q(tau)`` and taken through the standardisation (section 3.2 of the paper).

    Args:
        weight: Latent weights, output channels first.
        alpha: Per-output-channel scale, shape ``(O,)``.
        tau: 0-dim tensor, the ReCU quantile.

    Returns:
        A tensor shaped like ``weight`` whose entries are ``+alpha_o`` or ``-alpha_o``.
    """
    return _ReCUWeight.apply(weight, alpha, tau)


class _SignConv2d(torch.autograd.Function):
    """``conv2d(sign(x), weight, bias)`` with the ApproxSign window as the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, standardize):
        out = F.conv2d(binary_sign(x), weight, bias, stride, padding, dilation, groups)
        tensors = [x, weight]
        if standardize:
            correction = 1 if x[0].numel() > 1 else 0
            var, mean = torch.var_mean(_stats_dtype(x), dim=(1, 2, 3), keepdim=True, correction=correction)
            tensors += [mean, torch.rsqrt(var + EPS)]
        ctx.save_for_backward(*tensors)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = out.dtype
        ctx.standardize = standardize
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *stats = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        cd = ctx.compute_dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_sign, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(cd),
            binary_sign(x, cd),
            weight.to(cd),
            ctx.bias_shape,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b and ctx.bias_shape is not None],
        )
        grad_x = None
        if need_x:
            grad_x = _approx_sign_backward(grad_sign, _stats_dtype(x), *stats).to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _approx_sign_backward(grad: Tensor, x: Tensor, mean: Tensor | None = None, rstd: Tensor | None = None) -> Tensor:
    """Gradient of ``sign(A0)`` with the window ``max(0, 2 - 2|A0|)``.

    Without statistics ``A0 = x``. With them (training) ``A0 = x * r``, ``r = (var + eps)^-1/2`` per
    sample, and the variance path adds ``-r^3 (x - mean) sum(h x) / (n - 1)`` where ``h`` is the
    windowed gradient with respect to ``A0``.
    """
    g = grad.to(x.dtype)
    if rstd is None:
        return (1.0 - x.abs()).clamp_(min=0.0).mul_(g).mul_(2.0)
    h = torch.addcmul(torch.ones_like(rstd), x.abs(), -rstd).clamp_(min=0.0).mul_(g).mul_(2.0)
    n = x[0].numel()
    coef = rstd.pow(3) * (h * x).sum(dim=(1, 2, 3), keepdim=True) / max(n - 1, 1)
    return torch.addcmul(coef * mean, h, rstd).addcmul_(x, -coef)


def sign_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    standardize: bool = True,
) -> Tensor:
    """2-D convolution of the binarized input: ``conv2d(sign(x), weight, bias)``.

    Zero padding is applied after the sign, so border taps contribute 0, as in the paper's code.
    The backward pass gives ``x`` the ApproxSign gradient window of Bi-Real Net (Liu et al., 2018)
    as ReCU uses it; with ``standardize`` the window is measured in units of each sample's
    standard deviation and the gradient also flows through that deviation (training mode).

    Args:
        x: Input, shape ``(N, C, H, W)``.
        weight: Convolution weight, already binary or float (activation-only binarization).
        bias: Optional bias, added after the weight's scale.
        stride: As in ``F.conv2d``.
        padding: Zero padding, a pair of ints.
        dilation: As in ``F.conv2d``.
        groups: As in ``F.conv2d``.
        standardize: Measure the gradient window per sample standard deviation (training).
    """
    return _SignConv2d.apply(x, weight, bias, stride, padding, dilation, groups, standardize)
