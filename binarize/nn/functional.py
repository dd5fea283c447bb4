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
multiply, not an activation-sized one) and saves per-channel statistics and its output (which the
convolution saves anyway); :func:`sign_conv2d` binarizes the input inside the convolution and saves
the real-valued input instead of a float copy of its sign, which it recomputes in the backward pass.
Neither reads a value back to the host.

In eager mode every op is a pass over memory, so both use as few passes and as few freshly allocated
buffers as they can (in-place ops on their own buffers; large fresh allocations page-fault on CPU), and
avoid the ops that are slow on CPU (``torch.where`` and boolean masks, ``var_mean``'s Welford update).
Under ``torch.compile`` the weight path runs as :class:`_ReCUWeightTraced` instead, an out-of-place form
that steers what the compiled graph keeps for the backward.
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
    """Sign with ``sign(0) = sign(-0.0) = +1``: every element becomes exactly +1 or -1 (NaN stays NaN).

    Computed as ``sign(sign(x) + 1/2)``, three vectorised passes, without a boolean mask: ``torch.where``
    runs an order of magnitude slower on CPU, and ``copysign(1, x)`` would map -0.0 to -1.

    Args:
        x: Any real tensor.
        dtype: Dtype of the result; that of ``x`` when omitted.

    Example::

        >>> binary_sign(torch.tensor([2.1, -0.3, 0.0, -0.0]))
        tensor([ 1., -1.,  1.,  1.])
    """
    if not x.is_floating_point():
        one = torch.ones((), dtype=dtype or x.dtype, device=x.device)
        return torch.where(x >= 0, one, -one)
    s = torch.sign(x).add_(0.5).sign_()
    return s if dtype is None or dtype == s.dtype else s.to(dtype)


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """``t`` shaped ``(O, 1, ..., 1)`` to broadcast over ``like`` (output channels first)."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _centred_stats(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, the centred weights and ``c / sqrt(var + eps)`` (unbiased variance).

    The variance is taken in two passes, ``|W - mean|^2 / (n - 1)``: as accurate as Welford's update that
    ``torch.var_mean`` runs, and several times faster on CPU. The mean is ``torch.mean``'s, so the signs
    are exactly those of ``W - W.mean()``; a zero mean is stored as -0.0, which makes every zero of
    ``W - mean`` a +0.0 (``-0.0 - (+0.0)`` would give -0.0), so ``copysign`` gives ``sign(0) = +1``.
    """
    dims = tuple(range(1, w.dim()))
    n = w[0].numel()
    mean = w.mean(dim=dims, keepdim=True)
    mean = _no_zero_mean(mean)
    centred = w - mean
    var = torch.linalg.vector_norm(centred, 2, dim=dims, keepdim=True).square_().div_(max(n - 1, 1))
    return mean, centred, WEIGHT_SCALE * torch.rsqrt(var + EPS)


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
    laplace_b = (centred.abs().sum(dim=dims, keepdim=True) * scale).sum() / centred.numel()
    return -laplace_b * torch.log(2.0 - 2.0 * tau.to(laplace_b.dtype))


def _backward_operands(
    weight: Tensor, alpha: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, tuple[int, ...], int, Tensor, Tensor]:
    """The operands both weight backwards start from.

    Returns:
        The weights and the gradient in the statistics dtype, the reduced dims, the fan-in ``n``, a
        scalar one and ``alpha`` shaped per output channel.
    """
    w = _stats_dtype(weight)
    one = torch.ones((), dtype=w.dtype, device=w.device)
    return w, grad.to(w.dtype), tuple(range(1, w.dim())), w[0].numel(), one, _per_channel(alpha, w).to(w.dtype)


class _ReCUWeight(torch.autograd.Function):
    """Binary weight ``alpha_o * sign(W - mean_o)`` with ReCU's masked straight-through gradient.

    Every weight-sized step is a vectorised elementwise op or a row reduction, in place where the
    buffer is ours: the weight path dominates the step time of small-input models.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, alpha: Tensor, tau: Tensor) -> Tensor:
        w = _stats_dtype(weight)
        mean, centred, scale = _centred_stats(w)
        threshold = recu_threshold(centred, scale, tau)
        # alpha * sign(centred), in the buffer of ``centred`` (which holds no -0.0, see _centred_stats)
        one = torch.ones((), dtype=w.dtype, device=w.device)
        out = torch.copysign(one, centred, out=centred).mul_(_per_channel(alpha, w).to(w.dtype))
        out = out.to(weight.dtype)
        # The output is saved too: the conv saves it anyway, and its sign bits give sign(centred)
        # (that of alpha * s is sign(alpha) xor sign(s), also for alpha = +-0).
        ctx.save_for_backward(weight, alpha, mean, scale, threshold, out)
        ctx.mark_non_differentiable(threshold)
        return out, threshold

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, None]:
        weight, alpha, mean, scale, threshold, out = ctx.saved_tensors
        w, g, dims, n, one, a = _backward_operands(weight, alpha, grad)
        centred = w - mean
        # Two weight-sized buffers and no other allocation: large fresh allocations page-fault on CPU.
        buf = torch.copysign(one, out).to(w.dtype)  # sign(alpha) * sign(centred), one pass over ``out``
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = buf.mul_(g).sum(dim=dims, keepdim=True) * torch.copysign(one, a)
            grad_alpha = grad_alpha.flatten().to(alpha.dtype)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            # The ReCU clamp passes the gradient where |W1| = |centred| * scale <= Q, i.e. |u| <= 1 for
            # u = centred * scale / Q (u = 0 when Q = inf). hardtanh_backward keeps -b < u < b, and no
            # float lies between 1 and b = 1 + eps, so the interval is exactly the closed [-1, 1].
            bound = 1.0 + torch.finfo(w.dtype).eps
            u = torch.mul(centred, scale / threshold, out=buf)
            masked = torch.ops.aten.hardtanh_backward.grad_input(g, u, -bound, bound, grad_input=buf)
            # Exact gradient of W1 = c (w - mean) / sigma (unbiased variance), with g_y = alpha * masked:
            # dL/dw = (c / sigma) [g_y - mean(g_y) - W1 * sum(g_y W1) / ((n - 1) c^2)]
            #       = k1 * masked + k0 + k2 * centred = k1 * masked + k2 * w + (k0 - k2 * mean) per channel.
            k1 = scale * a
            k0 = k1 * masked.sum(dim=dims, keepdim=True) / -n
            k2 = centred.mul_(masked).sum(dim=dims, keepdim=True)
            k2 = k2 * k1 * scale.square() / (-max(n - 1, 1) * WEIGHT_SCALE**2)
            grad_weight = masked.mul_(k1).add_(k0 - k2 * mean).addcmul_(w, k2).to(weight.dtype)
        return grad_weight, grad_alpha, None


class _ReCUWeightTraced(torch.autograd.Function):
    """:class:`_ReCUWeight` written for ``torch.compile``: out-of-place ops that Inductor fuses per channel.

    The same forward and the same gradients (up to rounding). Under compile the partitioner, not
    ``save_for_backward``, decides what the backward keeps, so the formulation steers it:

    * the sign is ``copysign``, never a comparison: a saved boolean mask is stored by Inductor's CPU
      code ~20x slower than the rest of the kernel;
    * every statistic is a row reduction of the forward pass, finished there into ``Q`` (which the
      caller stores: otherwise the partitioner moves the reductions into the backward, one more read
      of the weights), and the backward takes the signs from ``out``, which the convolution keeps
      anyway (otherwise it saves a float copy of the signs, one more write and read).

    Inductor then reads the weights three times forward (the sums, the squares and absolute
    deviations, the signs) and twice backward (the mask and projection sums, the gradient), with no
    saved copy of them.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, alpha: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        w = _stats_dtype(weight)
        dims, n = tuple(range(1, w.dim())), w[0].numel()
        row_sum = w.sum(dim=dims, keepdim=True)
        mean = _no_zero_mean(row_sum / n)
        centred = w - mean
        var = centred.square().sum(dim=dims, keepdim=True) / max(n - 1, 1)
        scale = WEIGHT_SCALE * torch.rsqrt(var + EPS)
        threshold = recu_threshold(centred, scale, tau)
        one = torch.ones((), dtype=w.dtype, device=w.device)
        out = (torch.copysign(one, centred) * _per_channel(alpha, w).to(w.dtype)).to(weight.dtype)
        ctx.save_for_backward(weight, alpha, row_sum, scale, threshold, out)
        ctx.mark_non_differentiable(threshold)
        return out, threshold

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, None]:
        weight, alpha, row_sum, scale, threshold, out = ctx.saved_tensors
        w, g, dims, n, one, a = _backward_operands(weight, alpha, grad)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (g * torch.copysign(one, out)).sum(dim=dims, keepdim=True) * torch.copysign(one, a)
            grad_alpha = grad_alpha.flatten().to(alpha.dtype)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            w1 = (w - _no_zero_mean(row_sum / n)) * scale
            masked = torch.where(w1.abs() <= threshold, g * a, 0.0)  # the ReCU clamp's gradient
            # the exact gradient through the standardisation, as in _ReCUWeight.backward
            row_mean = masked.sum(dim=dims, keepdim=True) / n
            projection = (masked * w1).sum(dim=dims, keepdim=True) / (max(n - 1, 1) * WEIGHT_SCALE**2)
            grad_weight = (scale * (masked - row_mean - w1 * projection)).to(weight.dtype)
        return grad_weight, grad_alpha, None


def _no_zero_mean(mean: Tensor) -> Tensor:
    """A zero mean as -0.0, so that ``W - mean`` holds no -0.0 and ``copysign`` gives sign(0) = +1."""
    return torch.where(mean == 0, -0.0, mean)


def recu_weight(weight: Tensor, alpha: Tensor, tau: Tensor, threshold_out: Tensor | None = None) -> Tensor:
    """ReCU binary weight, scaled per output channel.

    Forward: ``alpha_o * sign(W - mean_o)`` (ReCU's ``sign(clamp(W1, -Q, Q))`` equals the sign of the
    centred weight). Backward: ``dL/dalpha_o = sum(g * sign)``; the gradient of ``W`` is ``g * alpha``
    masked by ``|W1| <= Q(tau)`` and taken through the standardisation (section 3.2 of the paper).

    Args:
        weight: Latent weights, output channels first.
        alpha: Per-output-channel scale, shape ``(O,)``.
        tau: 0-dim tensor, the ReCU quantile.
        threshold_out: Optional 0-dim tensor that receives the threshold ``Q(tau)`` of this call
            (written in place, no host synchronisation).

    Returns:
        A tensor shaped like ``weight`` whose entries are ``+alpha_o`` or ``-alpha_o``.
    """
    function = _ReCUWeightTraced if torch.compiler.is_compiling() else _ReCUWeight
    out, threshold = function.apply(weight, alpha, tau)
    if threshold_out is not None:
        threshold_out.copy_(threshold.detach())
    return out


class _SignConv2d(torch.autograd.Function):
    """``conv2d(sign(x), weight, bias)`` with the ApproxSign window as the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, standardize, padding_mode="zeros"):
        tensors = [x, weight]
        signs = None
        if standardize:
            xs = _stats_dtype(x)
            dims = (1, 2, 3)
            mean = xs.mean(dim=dims, keepdim=True)
            centred = xs - mean
            var = torch.linalg.vector_norm(centred, 2, dim=dims, keepdim=True).square_()
            tensors += [mean, torch.rsqrt(var.div_(max(x[0].numel() - 1, 1)).add_(EPS))]
            if xs is x:  # the buffer of ``centred`` is free again: binarize into it
                signs = torch.sign(x, out=centred).add_(0.5).sign_()
        if signs is None:
            signs = binary_sign(x)
        pad = None
        if padding_mode != "zeros":
            pad = (padding[1], padding[1], padding[0], padding[0])
            signs, padding = F.pad(signs, pad, mode=padding_mode), (0, 0)
        out = F.conv2d(signs, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(*tensors)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.pad = None if pad is None else (pad, padding_mode)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *stats = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        cd = ctx.compute_dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        signs = binary_sign(x, cd)
        padded = signs if ctx.pad is None else F.pad(signs, ctx.pad[0], mode=ctx.pad[1])
        grad_sign, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(cd),
            padded,
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
            if ctx.pad is not None:
                grad_sign = _fold_padding(grad_sign, *ctx.pad, x.shape[2:])
            xs = _stats_dtype(x)
            # grad_sign is ours (a fresh output of convolution_backward): the window is applied in place
            buf = signs if signs.dtype == xs.dtype else None
            grad_x = _approx_sign_backward_(grad_sign.to(xs.dtype), xs, *stats, buf=buf)
            grad_x = grad_x.to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _fold_padding(grad: Tensor, pad: tuple[int, int, int, int], mode: str, size: tuple[int, int]) -> Tensor:
    """Backward of ``F.pad(t, pad, mode)`` for the reflect, replicate and circular modes.

    Each of them pads the two spatial axes independently, so the gradient of every padded copy is
    added back onto its source, one axis at a time; the source of each position along an axis is
    found by padding ``arange(length)`` the same way.
    """
    for dim, before, after, length in ((3, pad[0], pad[1], size[1]), (2, pad[2], pad[3], size[0])):
        if before == 0 and after == 0:
            continue
        positions = torch.arange(length, dtype=torch.float32, device=grad.device).view(1, 1, -1)
        source = F.pad(positions, (before, after), mode=mode).view(-1).long()
        shape = list(grad.shape)
        shape[dim] = length
        grad = grad.new_zeros(shape).index_add_(dim, source, grad)
    return grad


def _approx_sign_backward_(
    grad: Tensor, x: Tensor, mean: Tensor | None = None, rstd: Tensor | None = None, buf: Tensor | None = None
) -> Tensor:
    """Gradient of ``sign(A0)`` with the window ``max(0, 2 - 2|A0|)``, computed in the buffer of ``grad``.

    Without statistics ``A0 = x``. With them (training) ``A0 = x * r``, ``r = (var + eps)^-1/2`` per
    sample, and the variance path adds ``-r^3 (x - mean) sum(h x) / (n - 1)`` where ``h`` is the
    windowed gradient with respect to ``A0``. ``grad`` is overwritten; ``buf``, a scratch tensor
    shaped and typed like ``x``, saves the one allocation otherwise needed.
    """
    window = x.abs() if buf is None else torch.abs(x, out=buf)
    if rstd is None:
        return grad.mul_(window.neg_().add_(1.0).clamp_(min=0.0)).mul_(2.0)
    h = grad.mul_(window.mul_(-2.0 * rstd).add_(2.0).clamp_(min=0.0))
    dot = torch.mul(h, x, out=window).sum(dim=(1, 2, 3), keepdim=True)
    coef = rstd.pow(3) * dot / max(x[0].numel() - 1, 1)
    return h.mul_(rstd).add_(coef * mean).addcmul_(x, -coef)


def sign_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    standardize: bool = True,
    padding_mode: str = "zeros",
) -> Tensor:
    """2-D convolution of the binarized input: ``conv2d(sign(x), weight, bias)``.

    The padding is applied to the binary input: zero padding (border taps contribute 0, as in the
    paper's code) or, with another ``padding_mode``, ``F.pad(sign(x), mode=padding_mode)``.
    The backward pass gives ``x`` the ApproxSign gradient window of Bi-Real Net (Liu et al., 2018)
    as ReCU uses it; with ``standardize`` the window is measured in units of each sample's
    standard deviation (of ``x``, before any padding) and the gradient also flows through that
    deviation (training mode).

    Args:
        x: Input, shape ``(N, C, H, W)``.
        weight: Convolution weight, already binary or float (activation-only binarization).
        bias: Optional bias, added after the weight's scale.
        stride: As in ``F.conv2d``.
        padding: Padding of each spatial side, a pair of ints.
        dilation: As in ``F.conv2d``.
        groups: As in ``F.conv2d``.
        standardize: Measure the gradient window per sample standard deviation (training).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as in ``nn.Conv2d``.
    """
    return _SignConv2d.apply(x, weight, bias, stride, padding, dilation, groups, standardize, padding_mode)
