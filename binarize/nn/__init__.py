"""Binary layers: ReCU convolutions and the functions they are built from.

``PackedBinaryConv2d`` (the deployable layer) and ``kernel_info`` are imported on first access, so that
``import binarize`` does not import the runtime.
"""

from binarize.nn.conv import ReCUConv2d
from binarize.nn.functional import binary_sign, recu_weight, sign_conv2d
from binarize.nn.options import DEFAULT_TAU, LayerOptions

__all__ = [
    "DEFAULT_TAU",
    "LayerOptions",
    "PackedBinaryConv2d",
    "ReCUConv2d",
    "binary_sign",
    "kernel_info",
    "recu_weight",
    "sign_conv2d",
]


def __getattr__(name: str):
    if name == "PackedBinaryConv2d":
        from binarize.nn.packed import PackedBinaryConv2d

        return PackedBinaryConv2d
    if name == "kernel_info":
        from binarize.runtime.kernel import kernel_info

        return kernel_info
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
