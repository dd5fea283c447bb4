"""The one module of the export that touches the deployable layer and the runtime.

Everything the export needs from :class:`binarize.nn.PackedBinaryConv2d` and :mod:`binarize.runtime` goes
through the functions below. While the native runtime is not part of this build (``binarize.nn.packed``
absent) they use the pure-torch stand-in of :mod:`binarize.export._standin`, which has the same
constructor, state and forward semantics; ``NATIVE_RUNTIME`` says which one is in use.

Interface assumed of the real layer: ``PackedBinaryConv2d(in_channels, out_channels, kernel_size, stride,
padding, dilation, groups, padding_mode, activation_bias: bool)`` builds an empty shell;
``PackedBinaryConv2d.from_recu(conv, bn=None)`` folds ``alpha``, the conv bias and ``bn`` (float64) into
float32 ``mul``/``add``; its state is ``weight_bits`` (uint8 ``[O, kh, kw, Cbytes]``, OHWI, bits along the
group's input channels, LSB first, bit 1 = -1, ``Cbytes = 8 * ceil(Cin_per_group / 64)``, padding bits 0),
``mul``, ``add`` (float32 ``[O]``) and ``activation_bias`` (float32 ``[Cin]`` or None); its attribute
``kernel`` (None or a name from ``kernel_info()["available"]``) forces a kernel for its eager calls.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from binarize.nn.conv import ReCUConv2d

try:
    from binarize.nn.packed import PackedBinaryConv2d
    from binarize.runtime import kernel_info, pack_signs, packed_bytes, unpack_signs

    NATIVE_RUNTIME = True
except ImportError:  # the native runtime is not merged into this build yet
    from binarize.export._standin import PackedBinaryConv2d, kernel_info, pack_signs, packed_bytes, unpack_signs

    NATIVE_RUNTIME = False

__all__ = [
    "NATIVE_RUNTIME",
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
