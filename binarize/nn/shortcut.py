"""Real-valued shortcuts around binary convolutions (Bi-Real Net, Liu et al., ECCV 2018).

ReCU's published ResNets add the real-valued input of every binary conv to the output of its
BatchNorm (ReCU code: ``out = bn(conv(x)) + shortcut(x)``). When the shapes differ the shortcut
first average-pools by the stride, then either applies a float 1x1 convolution (ReActNet, ReCU
ImageNet) or pads the missing channels with zeros (ReCU CIFAR ResNet-20, "option A").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiRealShortcut"]


class BiRealShortcut(nn.Module):
    """Maps a conv's input to the shape of its output.

    Args:
        in_channels: Channels of the conv's input.
        out_channels: Channels of the conv's output.
        stride: Spatial reduction factor of the conv (1 = none).
        mode: ``avgpool_conv`` (a float 1x1 conv, initialised to copy the input channels into the
            first output channels, so it starts equal to ``zero_pad``) or ``zero_pad``.

    Example::

        >>> BiRealShortcut(16, 32, 2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, mode: str = "avgpool_conv") -> None:
        super().__init__()
        if mode not in ("avgpool_conv", "zero_pad"):
            raise ValueError(f"mode must be 'avgpool_conv' or 'zero_pad', got {mode!r}")
        if mode == "zero_pad" and out_channels < in_channels:
            raise ValueError("zero_pad needs out_channels >= in_channels")
        self.in_channels, self.out_channels, self.stride, self.mode = in_channels, out_channels, stride, mode
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None
        self.conv = None
        if mode == "avgpool_conv" and in_channels != out_channels:
            self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                idx = torch.arange(min(in_channels, out_channels))
                self.conv.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = self.pool(x)
        if self.conv is not None:
            return self.conv(x)
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, mode={self.mode!r}"
