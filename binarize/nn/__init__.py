"""Binary layers: ReCU convolutions and the functions they are built from."""

from binarize.nn.conv import DEFAULT_TAU, ReCUConv2d
from binarize.nn.functional import binary_sign, recu_weight, sign_conv2d

__all__ = ["DEFAULT_TAU", "ReCUConv2d", "binary_sign", "recu_weight", "sign_conv2d"]
