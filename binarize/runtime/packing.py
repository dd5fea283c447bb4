"""Bit packing of binary convolution weights: the packed layout of :class:`binarize.nn.PackedBinaryConv2d`.

Layout of ``weight_bits`` (what a packed file stores for one binary convolution):

* ``uint8`` of shape ``[O, kh, kw, Cbytes]`` (OHWI): output channel, kernel row, kernel column, then the
  input channels of the group as bits;
* ``Cbytes = 8 * ceil(Cin_per_group / 64)``: whole 64-bit words, stored as little-endian bytes, so a reader
  may view the last axis as ``uint64`` words (on a little-endian host) or keep bytes;
* within each byte the bits are LSB first: input channel ``c`` is bit ``c % 8`` of byte ``c // 8``;
* a bit of 1 means the weight -1, a bit of 0 means +1 (the opposite of ``ReCUConv2d.sign_bits()``,
  which is True for +1);
* the padding bits (input channels ``Cin_per_group`` up to ``8 * Cbytes``) are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["packed_bytes", "pack_signs", "unpack_signs"]


def packed_bytes(in_channels: int) -> int:
    """``Cbytes``, the bytes of one kernel tap's bits: ``8 * ceil(in_channels / 64)``."""
    return 8 * ((in_channels + 63) // 64)


def pack_signs(signs: Tensor) -> Tensor:
    """Packs binary weights into ``weight_bits`` (see the module docstring).

    Args:
        signs: Shape ``[O, Cin_per_group, kh, kw]``: booleans (True = +1, as ``ReCUConv2d.sign_bits()``
            returns) or real numbers (negative = -1, anything else = +1).

    Returns:
        ``uint8`` tensor ``[O, kh, kw, Cbytes]`` on the device of ``signs``.
    """
    if signs.dim() != 4:
        raise ValueError(f"pack_signs expects weights shaped [O, Cin, kh, kw], got shape {tuple(signs.shape)}")
    negative = ~signs if signs.dtype == torch.bool else signs < 0
    out_channels, in_channels, kh, kw = negative.shape
    cbytes = packed_bytes(in_channels)
    bits = torch.zeros((out_channels, kh, kw, cbytes * 8), dtype=torch.uint8, device=signs.device)
    bits[..., :in_channels] = negative.permute(0, 2, 3, 1).to(torch.uint8)
    place = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=signs.device)
    return (bits.view(out_channels, kh, kw, cbytes, 8) * place).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(weight_bits: Tensor, in_channels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The +-1 weights ``[O, in_channels, kh, kw]`` of ``weight_bits``, the inverse of :func:`pack_signs`.

    Args:
        weight_bits: ``uint8`` ``[O, kh, kw, Cbytes]``.
        in_channels: Input channels per group (``Cbytes`` holds them rounded up to 64).
        dtype: Dtype of the result.
    """
    if weight_bits.dtype != torch.uint8 or weight_bits.dim() != 4:
        raise ValueError(
            f"weight_bits must be uint8 shaped [O, kh, kw, Cbytes], got {weight_bits.dtype} {tuple(weight_bits.shape)}"
        )
    if weight_bits.shape[3] != packed_bytes(in_channels):
        raise ValueError(
            f"weight_bits has {weight_bits.shape[3]} bytes per tap; {in_channels} input channels need "
            f"{packed_bytes(in_channels)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=weight_bits.device)
    bits = (weight_bits.unsqueeze(-1) >> shifts) & 1
    bits = bits.flatten(3)[..., :in_channels].permute(0, 3, 1, 2)
    return (1 - 2 * bits.to(torch.int8)).to(dtype)
