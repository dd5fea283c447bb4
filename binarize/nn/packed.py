"""``PackedBinaryConv2d``: the deployable, inference-only form of a :class:`~binarize.nn.ReCUConv2d`.

The layer computes, exactly, what ``ReCUConv2d`` (eval mode) followed by an optional ``BatchNorm2d`` (eval
statistics) computes::

    acc = conv2d(sign(x + beta), sign(W - mean_o))          integer, zero padding contributes 0
    out = (float32)acc * mul[o] + add[o]                    two float32 roundings

with ``sign(0) = sign(-0.0) = +1``; the per-channel scale ``alpha``, the conv bias and the BatchNorm fold
into ``mul`` and ``add`` (computed in float64, stored in float32). It runs the native 1-bit kernel of
:mod:`binarize.runtime` (or its exact pure-torch fallback; see :func:`binarize.runtime.kernel_info`).

State (buffers; nothing is a parameter and nothing needs a gradient):

* ``weight_bits``: ``uint8 [O, kh, kw, Cbytes]``, OHWI: bits along the input channels of the group, LSB
  first within each byte, bit 1 = weight -1, bit 0 = +1, ``Cbytes = 8 * ceil(Cin_per_group / 64)`` (whole
  little-endian 64-bit words), padding bits 0 (:mod:`binarize.runtime.packing`);
* ``mul``, ``add``: ``float32 [O]``;
* ``activation_bias``: ``float32 [Cin]``, only when the source layer learns one (ReActNet's RSign).

Hyper-parameters are plain attributes: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
``padding``, ``dilation``, ``groups``, ``padding_mode``, as in ``nn.Conv2d``. The attribute ``kernel``
(not saved; None by default) can name a kernel for this layer's eager calls, for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize.errors import ConfigError, TrainingError
from binarize.nn.conv import ReCUConv2d
from binarize.runtime import kernel as _kernel
from binarize.runtime.ops import packed_conv2d
from binarize.runtime.packing import pack_signs, packed_bytes

__all__ = ["PackedBinaryConv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


class PackedBinaryConv2d(nn.Module):
    """Inference-only binary convolution on packed 1-bit weights (see the module docstring).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Int or pair.
        stride: Int or pair.
        padding: Int or pair: pixels on each side (``"same"``/``"valid"`` are resolved by ``ReCUConv2d``).
        dilation: Int or pair.
        groups: As in ``nn.Conv2d``; more than 1 runs the pure-torch kernel.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        activation_bias: Whether the layer holds a per-input-channel ``activation_bias`` buffer.
        device: Device of the buffers.

    The buffers start as all-+1 weights, ``mul = 1``, ``add = 0`` (the raw accumulator); fill them with
    :meth:`from_tensors`, :meth:`from_recu` or ``load_state_dict``.

    Example::

        >>> conv = ReCUConv2d(16, 32, 3, padding=1, bias=False).eval()
        >>> packed = PackedBinaryConv2d.from_recu(conv)
        >>> packed(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

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
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        cbytes = packed_bytes(in_channels // groups)
        self.register_buffer(
            "weight_bits", torch.zeros((out_channels, kh, kw, cbytes), dtype=torch.uint8, device=device)
        )
        self.register_buffer("mul", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("add", torch.zeros(out_channels, dtype=torch.float32, device=device))
        if activation_bias:
            self.register_buffer("activation_bias", torch.zeros(in_channels, dtype=torch.float32, device=device))
        else:
            self.register_buffer("activation_bias", None)
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
        """Builds the layer from its state (what a packed-file loader reads back).

        Args:
            weight_bits: ``uint8 [O, kh, kw, Cbytes]``; its shape gives ``out_channels`` and ``kernel_size``.
            mul: ``[O]``, stored as float32.
            add: ``[O]``, stored as float32.
            activation_bias: ``[in_channels]`` or None.
            in_channels: Input channels (``Cbytes`` holds them per group, rounded up to 64).
            stride: As in the constructor.
            padding: As in the constructor.
            dilation: As in the constructor.
            groups: As in the constructor.
            padding_mode: As in the constructor.
        """
        if weight_bits.dtype != torch.uint8 or weight_bits.dim() != 4:
            raise ConfigError(
                f"weight_bits must be uint8 [O, kh, kw, Cbytes], got {weight_bits.dtype} {tuple(weight_bits.shape)}"
            )
        out_channels, kh, kw, _ = weight_bits.shape
        layer = cls(
            in_channels,
            out_channels,
            (kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
            activation_bias=activation_bias is not None,
            device=weight_bits.device,
        )
        state = {"weight_bits": weight_bits, "mul": mul, "add": add}
        if activation_bias is not None:
            state["activation_bias"] = activation_bias
        for name, value in state.items():
            target = getattr(layer, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(f"{name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_recu(cls, layer: ReCUConv2d, bn: nn.BatchNorm2d | None = None) -> PackedBinaryConv2d:
        """Packs a trained ``ReCUConv2d``, folding ``alpha``, its bias and a following BatchNorm.

        In float64: ``m = alpha * gamma / sqrt(var + eps)`` and ``c = (bias - mean) * gamma / sqrt(var + eps)
        + beta`` with the BatchNorm's running statistics (without ``bn``: ``m = alpha``, ``c = bias`` or 0);
        stored as float32 ``mul``/``add``. The weight bits are ``layer.sign_bits()``.

        Args:
            layer: The binary convolution (binary weights; its mode does not matter).
            bn: The BatchNorm that directly follows it, or None.

        Raises:
            ConfigError: ``layer`` keeps float weights, or ``bn`` does not fit it.
        """
        if not isinstance(layer, ReCUConv2d):
            raise ConfigError(f"from_recu takes a ReCUConv2d, got {type(layer).__name__}")
        if not layer.binarize_weights:
            raise ConfigError("cannot pack a ReCUConv2d with binarize_weights=False: its weights are not binary")
        f64 = torch.float64
        m = layer.alpha.detach().to(f64)
        c = layer.bias.detach().to(f64) if layer.bias is not None else torch.zeros_like(m)
        if bn is not None:
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != layer.out_channels:
                raise ConfigError(f"bn must be a BatchNorm2d over {layer.out_channels} channels, got {bn!r}")
            if bn.running_mean is None or bn.running_var is None:
                raise ConfigError("bn has no running statistics (track_running_stats=False): nothing to fold")
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
        """The kernel this layer runs on: a native kernel name, or ``"torch"`` (groups > 1, not on CPU)."""
        if self.groups != 1 or self.weight_bits.device.type != "cpu":
            return "torch"
        return self.kernel or _kernel.active_kernel()

    def train(self, mode: bool = True) -> PackedBinaryConv2d:
        if mode:
            raise TrainingError(
                "PackedBinaryConv2d is inference-only: train the ReCUConv2d model, then pack it again (call .eval())"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" and padding != (0, 0):
            # the binary input padded as ReCUConv2d pads it: the sign commutes with these copies
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode)
            padding = (0, 0)
        return packed_conv2d(
            x,
            self.weight_bits,
            self.mul,
            self.add,
            self.activation_bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            kernel=self.kernel,
        )

    def _apply(self, fn, recurse=True):
        # ``mul``, ``add`` and ``activation_bias`` stay float32 whatever dtype the module is cast to
        # (``model.half()`` must not round the folded constants); the values from before the cast are kept.
        before = {name: getattr(self, name) for name in ("mul", "add", "activation_bias")}
        super()._apply(fn, recurse)
        for name, value in before.items():
            after = getattr(self, name)
            if value is not None and after.dtype != torch.float32:
                setattr(self, name, value.to(device=after.device, dtype=torch.float32))
        return self

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.activation_bias is not None:
            text += ", activation_bias=True"
        return text
