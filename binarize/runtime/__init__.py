"""Deployment runtime: the native 1-bit convolution kernel and its pure-torch fallback.

* :func:`packed_conv2d`: the packed binary convolution (also the custom op ``binarize::packed_conv2d``);
* :func:`kernel_info`: which kernel runs here and why (``BINARIZE_KERNEL`` chooses, read on first use);
* :func:`pack_signs` / :func:`unpack_signs`: the packed weight layout (:mod:`binarize.runtime.packing`).

Importing this package loads no shared library; the first convolution (or ``kernel_info()``) does.
"""

from binarize.runtime.kernel import ENV_VAR, KERNELS, KernelWarning, kernel_info
from binarize.runtime.ops import packed_conv2d
from binarize.runtime.packing import pack_signs, packed_bytes, unpack_signs

__all__ = [
    "ENV_VAR",
    "KERNELS",
    "KernelWarning",
    "kernel_info",
    "pack_signs",
    "packed_bytes",
    "packed_conv2d",
    "unpack_signs",
]
