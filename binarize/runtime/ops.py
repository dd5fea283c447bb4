"""``binarize::packed_conv2d``: the packed binary convolution as one custom op.

Eager calls of :func:`packed_conv2d` go straight to the kernel (a custom-op call costs tens of
microseconds); under ``torch.compile`` or ``torch.export`` (and for traced, non-plain tensors) it calls
``torch.ops.binarize.packed_conv2d``, an opaque op with a fake (meta) implementation, so the graph holds
one node per convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from binarize.runtime import kernel as _kernel

__all__ = ["packed_conv2d"]

_SCHEMA = (
    "(Tensor x, Tensor weight_bits, Tensor mul, Tensor add, Tensor? activation_bias, "
    "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor"
)


@torch.library.custom_op("binarize::packed_conv2d", mutates_args=(), schema=_SCHEMA)
def _packed_conv2d_op(x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups):
    return _kernel.conv2d(x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups)


@_packed_conv2d_op.register_fake
def _packed_conv2d_fake(x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups):
    oh, ow = _kernel.output_size(x.shape[2:], weight_bits.shape[1:3], stride, padding, dilation)
    return _kernel._empty_output(x, weight_bits.shape[0], oh, ow)


def packed_conv2d(
    x: Tensor,
    weight_bits: Tensor,
    mul: Tensor,
    add: Tensor,
    activation_bias: Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    *,
    kernel: str | None = None,
) -> Tensor:
    """The packed binary convolution ``(float)conv(sign(x + beta), W) * mul + add``, zero padding.

    Arguments as for :func:`binarize.runtime.kernel.conv2d`; ``kernel`` (a name from
    ``kernel_info()["available"]``) picks a kernel for this eager call, and is ignored when compiled.

    Returns:
        float32 ``[N, O, OH, OW]``, channels-last.
    """
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return torch.ops.binarize.packed_conv2d(
            x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups
        )
    return _kernel.conv2d(x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups, kernel=kernel)
