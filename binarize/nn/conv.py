"""``ReCUConv2d``: a drop-in ``nn.Conv2d`` with ReCU binary weights and binary activations.

Xu et al., "ReCU: Reviving the Dead Weights in Binary Neural Networks", ICCV 2021. The layer keeps
``nn.Conv2d``'s constructor and its ``weight`` / ``bias`` parameters (the latent float weights), and
adds a per-output-channel scale ``alpha`` and the ReCU quantile ``tau``. Its deployable form is
:meth:`ReCUConv2d.sign_bits` (the signs of the centred weights) plus ``alpha`` (and ``bias``), which
fold into a following BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from binarize.nn.functional import _stats_dtype, binary_sign, recu_weight, sign_conv2d
from binarize.nn.options import DEFAULT_TAU, LayerOptions

__all__ = ["ReCUConv2d", "DEFAULT_TAU"]


class ReCUConv2d(nn.Conv2d):
    """Conv2d with 1-bit weights and 1-bit activations, trained with ReCU.

    Forward: ``alpha_o * conv2d(sign(x + beta), sign(W - mean_o)) + bias``; see
    :mod:`binarize.nn.functional` for the gradients. The padding pads the binary input: zero padding
    (border taps contribute 0) or the ``padding_mode`` given; the per-sample statistics of the
    activation gradient are those of the unpadded input.

    Args:
        *args: As for ``nn.Conv2d``.
        binarize_weights: If False the float weights are used as they are (no ``alpha``) and only
            the activations are binarized: the first stage of two-stage training (ReActNet).
        learn_activation_bias: Add a learnable per-input-channel bias ``beta`` (initially 0) to the
            input before its sign, i.e. a learnable threshold (ReActNet's RSign, Liu et al., ECCV 2020).
            Without it ``beta`` is absent and the threshold is 0, as in the paper.
        **kwargs: As for ``nn.Conv2d``.

    Attributes:
        alpha: Learnable per-output-channel scale, initialised by :meth:`reset_alpha`.
        tau: 0-dim float32 buffer, the ReCU quantile; update it in place (``layer.tau.fill_(v)``).
        threshold: 0-dim float32 buffer, not saved: the threshold ``Q(tau)`` of the last forward with
            binary weights (NaN before it), for diagnostics: the weights with ``|W1| > Q`` get no
            gradient. Storing it also keeps its statistics in the forward pass under ``torch.compile``.
        activation_bias: The learnable ``beta`` of shape ``(in_channels,)``, or None.

    Example::

        >>> conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        >>> layer = ReCUConv2d.from_float(conv)
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self, *args, binarize_weights: bool = True, learn_activation_bias: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.padding, str):
            self.padding = _numeric_padding(self.padding, self.kernel_size, self.dilation)
        self.binarize_weights = binarize_weights
        self.alpha = nn.Parameter(torch.empty(self.out_channels, device=self.weight.device, dtype=self.weight.dtype))
        self.register_buffer("tau", torch.tensor(DEFAULT_TAU, dtype=torch.float32, device=self.weight.device))
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=self.weight.device)
        self.register_buffer("threshold", nan, persistent=False)
        if learn_activation_bias:
            like = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.activation_bias = nn.Parameter(torch.zeros(self.in_channels, **like))
        else:
            self.register_parameter("activation_bias", None)
        self.reset_alpha()

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight: Tensor | None = None, options: LayerOptions | None = None
    ) -> ReCUConv2d:
        """Builds the binary layer from a float convolution, copying its weights unchanged.

        The latent weights are stored in the channels-last memory format (the values are those of
        ``conv``; a state dict or a saved file holds them as usual).

        Args:
            conv: The float convolution; it is not modified.
            weight: The effective float weight, when ``conv`` computes one in its forward
                (weight-standardised convolutions); ``conv.weight`` otherwise.
            options: Weight binarization, activation bias and initial tau; the defaults when omitted.
        """
        options = options if options is not None else LayerOptions()
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot binarize {type(conv).__name__}: {reason}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",  # no random initialisation of weights that are overwritten at once
            dtype=conv.weight.dtype,
            binarize_weights=options.binarize_weights,
            learn_activation_bias=options.activation_bias,
        ).to_empty(device=conv.weight.device)
        with torch.no_grad():
            layer.weight.copy_(conv.weight if weight is None else weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
            layer.tau.fill_(options.tau)
            layer.threshold.fill_(float("nan"))
            if layer.activation_bias is not None:
                layer.activation_bias.zero_()
        layer.reset_alpha()
        # The latent weights are kept channels-last, the layout the convolution itself prefers on CPU
        # (oneDNN) and on GPU: compiled, the binary weight is then written and its gradient read in
        # the order the convolution wants (M1 compiled 1.19 -> 1.09, docs/benchmarks.md).
        return layer.to(memory_format=torch.channels_last)

    @staticmethod
    def unsupported_reason(conv: nn.Conv2d) -> str | None:
        """Why ``conv``'s settings cannot be binarized, or None when they can."""
        if isinstance(conv.padding, str):
            try:
                _numeric_padding(conv.padding, conv.kernel_size, conv.dilation)
            except ValueError as err:
                return str(err)
        return None

    @torch.no_grad()
    def reset_alpha(self) -> None:
        """Sets ``alpha`` to the mean absolute centred weight of each output channel.

        This is the L1-optimal scale of ``sign(W - mean_o)`` (XNOR-Net style), so a converted layer
        starts with the magnitude of the pretrained one; ReCU's code initialises it at random.
        """
        w = _stats_dtype(self.weight.detach())
        dims = tuple(range(1, w.dim()))
        self.alpha.copy_((w - w.mean(dim=dims, keepdim=True)).abs().mean(dim=dims))

    def binary_weight(self) -> Tensor:
        """The weight the forward pass uses: ``alpha_o * sign(W - mean_o)``, or the float weight."""
        if not self.binarize_weights:
            return self.weight
        return recu_weight(self.weight, self.alpha, self.tau, self.threshold)

    @torch.no_grad()
    def sign_bits(self) -> Tensor:
        """Deployable 1-bit weights: True where ``W - mean_o >= 0`` (+1), False for -1."""
        w = _stats_dtype(self.weight)
        dims = tuple(range(1, w.dim()))
        return binary_sign(w - w.mean(dim=dims, keepdim=True)) > 0

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bias is not None:
            x = x + self.activation_bias.to(x.dtype).view(1, -1, 1, 1)
        if self.binarize_weights and not self.training and not torch.is_grad_enabled():
            return self._exact_inference(x)
        return sign_conv2d(
            x,
            self.binary_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.training,
            self.padding_mode,
        )

    def _exact_inference(self, x: Tensor) -> Tensor:
        """``alpha_o * conv2d(sign(x), sign(W - mean_o)) + bias`` with the scale applied after the
        convolution: the +-1 products sum exactly (in float32 up to 2^24 terms), so the output is the
        integer count (the packed kernel's popcount result) times ``alpha`` rounded once, whatever order
        the convolution sums in. Inference only (eval mode, no autograd): ``alpha`` premultiplied into the
        weights, as in training, rounds every partial sum."""
        signs = recu_weight(self.weight, torch.ones_like(self.alpha), self.tau, self.threshold)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        out = sign_conv2d(x, signs, None, *conv, False, self.padding_mode)
        out.mul_(self.alpha.to(out.dtype).view(1, -1, 1, 1))  # no autograd here: in place
        return out if self.bias is None else out.add_(self.bias.to(out.dtype).view(1, -1, 1, 1))

    def _apply(self, fn, recurse=True):
        # ``tau`` (and ``threshold``) stay float32 whatever dtype the module is cast to: a bf16 tau would
        # move Q. The value is taken from before the cast, so a detour through half precision does not round it.
        before = {name: getattr(self, name) for name in ("tau", "threshold")}
        super()._apply(fn, recurse)
        for name, value in before.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, value.to(device=after.device, dtype=torch.float32))
        return self

    def extra_repr(self) -> str:
        extra = "" if self.binarize_weights else ", binarize_weights=False"
        if self.activation_bias is not None:
            extra += ", learn_activation_bias=True"
        return super().extra_repr() + extra


def _numeric_padding(padding: str, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
    if any(t % 2 for t in total):
        raise ValueError("padding='same' with an even kernel extent pads asymmetrically")
    return tuple(t // 2 for t in total)
