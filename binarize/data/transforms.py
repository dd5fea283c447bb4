"""Transforms from a decoded image to a normalised tensor: train augmentation and the evaluation crop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from binarize.data.config import ResolvedData

__all__ = ["build_transforms"]


class _ToMode:
    """Converts PIL images to ``mode`` ("RGB" or "L"); leaves other inputs alone."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image.convert(self.mode) if hasattr(image, "convert") and image.mode != self.mode else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _resize_size(height: int, width: int, crop_pct: float) -> int | tuple[int, int]:
    """Resize target: the shorter side for square inputs, else both sides, scaled by ``1 / crop_pct``."""
    scaled = (math.floor(height / crop_pct + 1e-6), math.floor(width / crop_pct + 1e-6))
    return scaled[0] if height == width else scaled


def build_transforms(resolved: ResolvedData, train: bool) -> Callable[[Any], torch.Tensor]:
    """The transform from a PIL image to a normalised ``float32`` tensor of ``resolved.input_size``.

    Every transform first converts the image to RGB (3 channels) or grayscale (1 channel). Train,
    by ``resolved.augmentation``: ``cifar`` resizes to the input size (shorter side for a square
    input; a no-op for images already that size), then ``RandomCrop(size, padding=4)`` and a
    horizontal flip; ``imagenet`` is ``RandomResizedCrop(size)`` and a horizontal flip; ``none`` is
    the evaluation transform. Evaluation resizes to ``floor(size / crop_pct)`` and center-crops
    ``size`` (with crop_pct 1 and square images: just a resize). Then scaling to [0, 1] and
    ``Normalize(mean, std)``. Random draws come from the global torch generator (see the module
    docstring for how loaders make them reproducible).

    Args:
        resolved: The resolved data settings.
        train: The train (augmenting) transform rather than the evaluation one.

    Returns:
        A picklable callable (a torchvision ``v2.Compose``) returning a plain tensor.
    """
    from torchvision.transforms import v2

    channels, height, width = resolved.input_size
    size = (height, width)
    interpolation = v2.InterpolationMode(resolved.interpolation)
    steps: list[Callable[..., Any]] = [_ToMode("L" if channels == 1 else "RGB")]
    style = resolved.augmentation if train else "none"
    if style == "cifar":
        steps += [
            v2.Resize(_resize_size(height, width, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomCrop(size, padding=4),
            v2.RandomHorizontalFlip(),
        ]
    elif style == "imagenet":
        steps += [v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = _resize_size(height, width, resolved.crop_pct)
        steps += [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(resolved.mean), list(resolved.std)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)
