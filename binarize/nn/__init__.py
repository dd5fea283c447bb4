"""Binary layers: ReCU convolutions and the functions they are built from."""

from binarize.nn.conv import ReCUConv2d
from binarize.nn.functional import binary_sign, recu_weight, sign_conv2d
from binarize.nn.options import DEFAULT_TAU, LayerOptions

__all__ = ["DEFAULT_TAU", "LayerOptions", "ReCUConv2d", "binary_sign", "recu_weight", "sign_conv2d"]
