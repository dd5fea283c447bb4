"""The recipe's ``data:`` section and its resolution against the model: every data setting decided once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

from binarize.config import Config, check
from binarize.data.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DataConfig", "ResolvedData", "resolve_data_config"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 weights, as PIL's RGB -> L conversion
_SMALL_INPUT = 64  # "auto" augmentation picks the CIFAR style up to this many pixels a side


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """The ``data:`` section of a recipe: which dataset, how images become tensors, how they load.

    Args:
        dataset: ``folder`` (an image-folder tree ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``
            or ``ROOT/test/<class>/*``), or the torchvision ``cifar10`` / ``cifar100`` kept in ROOT.
        input_size: ``(channels, height, width)`` of the model input; None takes the model's
            ``pretrained_cfg``, else ``(3, 224, 224)``. Channels are 1 (grayscale) or 3 (RGB).
        mean: Per-channel normalisation mean of RGB pixels in [0, 1]; None takes the model's.
        std: Per-channel normalisation standard deviation; None takes the model's.
        interpolation: Resampling for resizes; None takes the model's, else ``bilinear``.
        crop_pct: Evaluation center crop as a share of the resized image (0.875: resize to
            size / 0.875, crop size); None takes the model's, else 0.875.
        augmentation: Train augmentation. ``cifar``: resize to the input size (a no-op for images
            already that size), random crop with 4 px padding, horizontal flip. ``imagenet``:
            random resized crop and horizontal flip. ``none``: the evaluation transform. ``auto``:
            ``cifar`` when the input is at most 64 px a side, else ``imagenet``.
        download: Let torchvision download ``cifar10`` / ``cifar100`` into ROOT when missing.
        workers: Loader worker processes; 0 loads in the main process.
        pin_memory: Pin batches in page-locked memory (only on CUDA devices).
        val_split: Folder of the validation split under ROOT (``folder`` datasets only); None picks
            ``val`` when ``ROOT/val`` exists, else ``test``.

    Example::

        >>> DataConfig(input_size=(3, 32, 32), workers=0).to_dict()["input_size"]
        [3, 32, 32]
    """

    dataset: Literal["folder", "cifar10", "cifar100"] = "folder"
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = None
    augmentation: Literal["auto", "cifar", "imagenet", "none"] = "auto"
    download: bool = False
    workers: int = 2
    pin_memory: bool = True
    val_split: str | None = None

    def validate(self) -> None:
        if self.input_size is not None:
            _check_input_size(self.input_size)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                check(len(value) == 3, name, f"give 3 values (R, G, B), got {len(value)}: {value!r}")
                _check_stats(name, value)
        if self.crop_pct is not None:
            _check_crop_pct(self.crop_pct)
        check(self.workers >= 0, "workers", f"must be >= 0 (0 loads in the main process), got {self.workers}")
        check(
            not self.download or self.dataset != "folder",
            "download",
            "applies only to dataset cifar10 or cifar100; remove it for an image folder",
        )
        if self.val_split is not None:
            check(
                self.dataset == "folder",
                "val_split",
                f"applies only to dataset 'folder' ({self.dataset} has its test set)",
            )
            name = self.val_split
            check(
                name not in ("", ".", "..", "train") and "/" not in name and "\\" not in name,
                "val_split",
                f"must name a folder under the data root other than 'train' (e.g. 'val'), got {name!r}",
            )


@dataclasses.dataclass(frozen=True)
class ResolvedData(Config):
    """The data settings in force, every field decided (from the recipe, the model or the defaults).

    Args:
        input_size: ``(channels, height, width)``.
        mean: One normalisation mean per channel.
        std: One normalisation standard deviation per channel.
        interpolation: Resampling used by resizes.
        crop_pct: Evaluation center crop as a share of the resized image.
        augmentation: Train augmentation style (``auto`` resolved).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    crop_pct: float = 0.875
    augmentation: Literal["cifar", "imagenet", "none"] = "imagenet"

    def validate(self) -> None:
        _check_input_size(self.input_size)
        channels = self.input_size[0]
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(len(value) == channels, name, f"needs {channels} value(s) for {channels} channel(s), got {value!r}")
            _check_stats(name, value)
        _check_crop_pct(self.crop_pct)


def _check_input_size(size: Sequence[int]) -> None:
    check(len(size) == 3, "input_size", f"give [channels, height, width], e.g. [3, 224, 224], got {size!r}")
    check(size[0] in (1, 3), "input_size", f"channels (first value) must be 1 or 3, got {size[0]}")
    check(min(size[1:]) >= 8, "input_size", f"height and width must be >= 8 pixels, got {size[1]}x{size[2]}")


def _check_stats(name: str, values: Sequence[float]) -> None:
    check(all(math.isfinite(v) for v in values), name, f"values must be finite numbers, got {values!r}")
    if name == "std":
        check(all(v > 0 for v in values), name, f"values must be > 0, got {values!r}")


def _check_crop_pct(crop_pct: float) -> None:
    check(
        0 < crop_pct <= 1,
        "crop_pct",
        f"must be in (0, 1], the share of the resized image the center crop keeps (e.g. 0.875), got {crop_pct}",
    )


def resolve_data_config(cfg: DataConfig, model: nn.Module | None = None) -> ResolvedData:
    """Decides every data setting: the recipe's value, else the model's ``pretrained_cfg``, else ImageNet's.

    timm models and binarize's zoo models carry a dict ``pretrained_cfg`` with ``input_size``,
    ``mean``, ``std``, ``interpolation`` and ``crop_pct``; it is read directly (timm is not needed).
    Malformed or unsupported model values are ignored. Mean and std are fitted to the channel
    count: one channel gets the luma-weighted average of RGB values, three channels repeat one value.

    Args:
        cfg: The recipe's data section.
        model: The float model the data feeds, or None.

    Returns:
        The resolved settings; ``augmentation`` is ``cifar``, ``imagenet`` or ``none``.

    Example::

        >>> resolve_data_config(DataConfig(input_size=(3, 32, 32))).augmentation
        'cifar'
    """
    pre = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    pre = pre if isinstance(pre, dict) else {}
    input_size = cfg.input_size or _model_value(pre, "input_size", _valid_size) or (3, 224, 224)
    channels = input_size[0]
    mean = _fit_channels(cfg.mean or _model_value(pre, "mean", _valid_stats) or IMAGENET_MEAN, channels)
    std = _fit_channels(cfg.std or _model_value(pre, "std", _valid_stats) or IMAGENET_STD, channels)
    interpolation = cfg.interpolation or _model_value(
        pre, "interpolation", lambda v: v in ("bilinear", "bicubic", "nearest")
    )
    crop_pct = cfg.crop_pct or _model_value(pre, "crop_pct", lambda v: isinstance(v, (int, float)) and 0 < v <= 1)
    augmentation = cfg.augmentation
    if augmentation == "auto":
        augmentation = "cifar" if max(input_size[1:]) <= _SMALL_INPUT else "imagenet"
    return ResolvedData(
        input_size=tuple(int(v) for v in input_size),
        mean=mean,
        std=std,
        interpolation=interpolation or "bilinear",
        crop_pct=float(crop_pct or 0.875),
        augmentation=augmentation,
    )


def _model_value(pre: dict[str, Any], key: str, valid: Callable[[Any], bool]) -> Any:
    value = pre.get(key)
    if isinstance(value, list):
        value = tuple(value)
    return value if value is not None and valid(value) else None


def _valid_size(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and all(isinstance(v, int) for v in value)
        and value[0] in (1, 3)
        and min(value[1:]) >= 8
    )


def _valid_stats(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) in (1, 3) and all(isinstance(v, (int, float)) for v in value)


def _fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(float(v) for v in values)
    if channels == 1:
        return (sum(w * v for w, v in zip(_LUMA, values, strict=True)),)
    return (float(values[0]),) * channels
