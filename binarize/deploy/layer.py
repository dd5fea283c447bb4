"""The one module of the deployment code that touches the deployable layer and the runtime.

Everything the export needs from :class:`binarize.nn.PackedBinaryConv2d` (its shell constructor,
``from_recu``, its state ``weight_bits``/``mul``/``add``/``activation_bias`` and its ``kernel`` attribute) and
from :mod:`binarize.runtime` goes through the functions below.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from binarize.nn.conv import ReCUConv2d
from binarize.nn.packed import PackedBinaryConv2d
from binarize.runtime import kernel_info, pack_signs, packed_bytes, unpack_signs

__all__ = [
    "PackedBinaryConv2d",
    "available_kernels",
    "empty_layer",
    "is_packed_layer",
    "kernel_info",
    "pack_layer",
    "pack_signs",
    "packed_bytes",
    "packed_layers",
    "plus_minus_one_weight",
    "set_kernel",
]


def pack_layer(conv: ReCUConv2d, bn: nn.BatchNorm2d | None) -> nn.Module:
    """The packed form of a binary conv, with ``bn`` (its BatchNorm, or None) folded in."""
    return PackedBinaryConv2d.from_recu(conv, bn)


def empty_layer(conv: ReCUConv2d) -> nn.Module:
    """A packed layer shaped like ``conv``, to load a packed file's tensors into."""
    return PackedBinaryConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        activation_bias=conv.activation_bias is not None,
        device=conv.weight.device,
    )


def is_packed_layer(module: nn.Module) -> bool:
    return isinstance(module, PackedBinaryConv2d)


def packed_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The packed binary convs of ``model`` with their qualified names."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, PackedBinaryConv2d))


def plus_minus_one_weight(layer: nn.Module) -> Tensor:
    """The layer's weights as float32 +-1, ``[O, Cin_per_group, kh, kw]`` (what ONNX's Conv takes)."""
    return unpack_signs(layer.weight_bits, layer.in_channels // layer.groups)


def available_kernels() -> list[str]:
    """The kernels the packed layers can run on here, fastest first (``torch`` last)."""
    return list(kernel_info()["available"])


def set_kernel(model: nn.Module, name: str | None) -> None:
    """Forces every packed layer of ``model`` onto kernel ``name`` (None: the process's active kernel)."""
    for _, layer in packed_layers(model):
        layer.kernel = name
