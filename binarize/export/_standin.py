"""A pure-torch stand-in for the native runtime layer, used only while ``binarize.nn.packed`` is absent.

The kernel branch provides :class:`binarize.nn.PackedBinaryConv2d` and :mod:`binarize.runtime`. This
module mirrors the parts of their interface that the export uses (the constructor, ``from_tensors``,
``from_recu``, the state ``weight_bits``/``mul``/``add``/``activation_bias``, the ``kernel`` attribute,
``pack_signs``/``unpack_signs``/``packed_bytes``, ``kernel_info``) with the kernel's exact pure-torch
semantics::

    acc = conv2d(sign(x + beta), W)        W = +-1 from the bits; zero padding contributes 0; exact
    out = (float32)acc * mul + add         two float32 roundings

so that export, files and tests run before the native layer is merged. :mod:`binarize.export.layer` imports
the real classes when they exist; delete this file once they are merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize.errors import ConfigError, TrainingError
from binarize.nn.conv import ReCUConv2d

__all__ = ["PackedBinaryConv2d", "kernel_info", "pack_signs", "packed_bytes", "unpack_signs"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def packed_bytes(in_channels: int) -> int:
    """Bytes of one kernel tap's bits: ``8 * ceil(in_channels / 64)`` (whole 64-bit words)."""
    return 8 * ((in_channels + 63) // 64)


def pack_signs(signs: Tensor) -> Tensor:
    """``[O, C, kh, kw]`` signs (bool True = +1, or reals: negative = -1) -> uint8 ``[O, kh, kw, Cbytes]``.

    Bits along the input channels, LSB first, bit 1 = -1, padding bits 0.
    """
    negative = ~signs if signs.dtype == torch.bool else signs < 0
    out_channels, in_channels, kh, kw = negative.shape
    cbytes = packed_bytes(in_channels)
    bits = torch.zeros((out_channels, kh, kw, cbytes * 8), dtype=torch.uint8, device=signs.device)
    bits[..., :in_channels] = negative.permute(0, 2, 3, 1).to(torch.uint8)
    place = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=signs.device)
    return (bits.view(out_channels, kh, kw, cbytes, 8) * place).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(weight_bits: Tensor, in_channels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The +-1 weights ``[O, in_channels, kh, kw]`` of ``weight_bits`` (the inverse of :func:`pack_signs`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=weight_bits.device)
    bits = (weight_bits.unsqueeze(-1) >> shifts) & 1
    bits = bits.flatten(3)[..., :in_channels].permute(0, 3, 1, 2)
    return (1 - 2 * bits.to(torch.int8)).to(dtype)


def kernel_info() -> dict:
    """What the stand-in runs on: the pure-torch path only."""
    return {
        "active": "torch",
        "requested": "auto",
        "available": ["torch"],
        "compiled": False,
        "rejected": {},
        "threads": torch.get_num_threads(),
        "library": None,
        "reason": "the native runtime (binarize.nn.packed) is not part of this build",
    }


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


class PackedBinaryConv2d(nn.Module):
    """Stand-in for ``binarize.nn.PackedBinaryConv2d`` (same constructor, state and forward semantics)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        activation_bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding_mode={padding_mode!r} is not one of {', '.join(PADDING_MODES)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.padding_mode = groups, padding_mode
        kh, kw = self.kernel_size
        shape = (out_channels, kh, kw, packed_bytes(in_channels // groups))
        self.register_buffer("weight_bits", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("mul", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("add", torch.zeros(out_channels, dtype=torch.float32, device=device))
        beta = torch.zeros(in_channels, dtype=torch.float32, device=device) if activation_bias else None
        self.register_buffer("activation_bias", beta)
        self.kernel: str | None = None
        self.training = False

    @classmethod
    def from_tensors(
        cls,
        weight_bits: Tensor,
        mul: Tensor,
        add: Tensor,
        activation_bias: Tensor | None = None,
        *,
        in_channels: int,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> PackedBinaryConv2d:
        out_channels, kh, kw, _ = weight_bits.shape
        layer = cls(
            in_channels, out_channels, (kh, kw), stride, padding, dilation, groups, padding_mode,
            activation_bias is not None, weight_bits.device,
        )  # fmt: skip
        state = {"weight_bits": weight_bits, "mul": mul, "add": add, "activation_bias": activation_bias}
        for name, value in state.items():
            if value is not None:
                getattr(layer, name).copy_(value.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_recu(cls, layer: ReCUConv2d, bn: nn.BatchNorm2d | None = None) -> PackedBinaryConv2d:
        if not layer.binarize_weights:
            raise ConfigError("cannot pack a ReCUConv2d with binarize_weights=False: its weights are not binary")
        f64 = torch.float64
        m = layer.alpha.detach().to(f64)
        c = layer.bias.detach().to(f64) if layer.bias is not None else torch.zeros_like(m)
        if bn is not None:
            gamma = bn.weight.detach().to(f64) if bn.weight is not None else torch.ones_like(m)
            shift = bn.bias.detach().to(f64) if bn.bias is not None else torch.zeros_like(m)
            inv = gamma / torch.sqrt(bn.running_var.detach().to(f64) + bn.eps)
            c = (c - bn.running_mean.detach().to(f64)) * inv + shift
            m = m * inv
        beta = layer.activation_bias
        return cls.from_tensors(
            pack_signs(layer.sign_bits()),
            m.to(torch.float32),
            c.to(torch.float32),
            None if beta is None else beta.detach().to(torch.float32),
            in_channels=layer.in_channels,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            padding_mode=layer.padding_mode,
        )

    @property
    def backend(self) -> str:
        return "torch"

    def train(self, mode: bool = True) -> PackedBinaryConv2d:
        if mode:
            raise TrainingError(
                "PackedBinaryConv2d is inference-only: train the ReCUConv2d model, then pack it again (call .eval())"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bias is not None:
            x = x + self.activation_bias.to(x.dtype).view(1, -1, 1, 1)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        signs = torch.where(x < 0, -one, one)
        padding = self.padding
        if self.padding_mode != "zeros" and padding != (0, 0):
            signs = F.pad(signs, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode)
            padding = (0, 0)
        weight = unpack_signs(self.weight_bits, self.in_channels // self.groups)
        acc = F.conv2d(signs, weight, None, self.stride, padding, self.dilation, self.groups).round_()
        return acc.mul_(self.mul.view(1, -1, 1, 1)).add_(self.add.view(1, -1, 1, 1))
