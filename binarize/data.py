"""The data pipeline of the fine-tuning engine: recipe ``data:`` section, transforms, datasets, loaders.

Flow, one function per step::

    DataConfig (recipe) + float model --resolve_data_config--> ResolvedData
    ResolvedData --build_transforms--> train / eval transforms
    DataConfig + root + ResolvedData --build_datasets--> Datasets (train, val, classes)
    Datasets --build_loaders--> Loaders (train, val; set_epoch)

How the engine uses it::

    resolved = resolve_data_config(recipe.data, float_model)
    datasets = build_datasets(recipe.data, data_dir, resolved)
    loaders = build_loaders(datasets, batch_size, recipe.data, seed=seed, limit_train=limit,
                            distributed=world_size > 1, device_type=device.type)
    try:
        for epoch in range(start_epoch, epochs):
            loaders.set_epoch(epoch, start_batch=batches_done if epoch == start_epoch else 0)
            for images, labels in loaders.train: ...
            for images, labels in loaders.val: ...  # sum loss/correct/count; all-reduce SUMs if distributed
    finally:
        loaders.close()  # stop the persistent worker processes
    # a DataError raised anywhere above has a one-line message: the CLI prints it as it is

**Reproducibility.** The train order of an epoch is a pure function of ``(seed, epoch)``, and so is
the augmentation: before loading sample ``i`` of epoch ``e`` the CPU random generator is seeded
with ``mix(seed, e, i)`` and restored afterwards. So batches do not depend on the number of
workers, on earlier epochs or on anything else the process did, and resuming at epoch ``e`` (batch
``k``) with :meth:`Loaders.set_epoch` reproduces the remaining batches bit for bit. Iterating a
loader never draws from the global torch generator (each loader has its own ``generator``). The
engine still owns the RNG state of the model (dropout) and the optimizer.

**Errors.** Everything a user can fix is a one-line :class:`~binarize.errors.DataError`: a missing
root, split or class folder, an empty class, class folders that differ between splits, an image
that does not decode. Loaders are :class:`Loader` instances: a ``DataLoader`` whose iterator turns
a ``DataError`` re-raised from a worker process (a message with a traceback) back into the
original one-line ``DataError`` (and stops the workers), so the engine catches the same error
with ``workers`` 0 or more.

**Workers.** With ``workers > 0`` both loaders keep their worker processes between epochs
(``persistent_workers``) until :meth:`Loaders.close`; torch runs each worker with one intra-op
thread (it calls ``torch.set_num_threads(1)`` itself, no ``worker_init_fn`` is needed). Memory
is pinned only for ``device_type == "cuda"``. Every object a worker needs is picklable, so the
``spawn`` and ``forkserver`` start methods work too.

**Distributed.** Each process gets a disjoint shard (:class:`EpochSampler`, rank and world size
from ``torch.distributed``). Train shards have equal lengths (at most ``world_size - 1`` images of
the epoch's permutation are left out). Val shards are not padded (``DistributedSampler`` would
count some images twice), so they differ by at most one image: evaluate without per-batch
collectives and all-reduce the sums of loss, correct predictions and counts at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from binarize._utils import mix_seed, nearest
from binarize.config import Config, check
from binarize.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataConfig",
    "ResolvedData",
    "Datasets",
    "Loaders",
    "Loader",
    "EpochSampler",
    "FolderDataset",
    "resolve_data_config",
    "build_transforms",
    "build_datasets",
    "stratified_subset",
    "build_loaders",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 weights, as PIL's RGB -> L conversion
_SMALL_INPUT = 64  # "auto" augmentation picks the CIFAR style up to this many pixels a side
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python"),
}


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
        _check_choices(self)
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
        _check_choices(self)
        _check_input_size(self.input_size)
        channels = self.input_size[0]
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(len(value) == channels, name, f"needs {channels} value(s) for {channels} channel(s), got {value!r}")
            _check_stats(name, value)
        _check_crop_pct(self.crop_pct)


def _check_choices(cfg: Config) -> None:
    """Checks ``Literal`` fields also for direct construction (``from_dict`` checks them already)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        choices = [
            a for arg in _union_args(hints[f.name]) if typing.get_origin(arg) is Literal for a in typing.get_args(arg)
        ]
        if choices and value is not None:
            suffix = nearest(str(value), [str(c) for c in choices])
            options = ", ".join(repr(c) for c in choices)
            check(value in choices, f.name, f"must be one of {options}, got {value!r}{suffix}")


def _union_args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _decode(path: str, mode: str) -> Any:
    """Opens and fully decodes one image; any failure is a :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Exception as err:  # whatever the decoder raises, the file is what the user must fix
        raise DataError(f"cannot decode image {path} ({_one_line(err)}): replace or delete the file") from err


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _visible(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".")


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir``; hidden folders (``.ipynb_checkpoints``) are skipped."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if _visible(e) and e.is_dir())


class FolderDataset(Dataset):
    """Labelled images of an image-folder split ``SPLIT/<class>/**/<image>``, like torchvision's ImageFolder.

    Classes are the sorted names of the visible subfolders; images are files with an extension in
    :data:`IMAGE_EXTENSIONS` (any case), found recursively in sorted order, hidden files and
    folders skipped. Images decode lazily in ``__getitem__``; a file that does not decode raises
    a :class:`DataError` naming it.

    Args:
        split_dir: The split folder (e.g. ``ROOT/train``).
        classes: Class names in label order; None uses the folders found. Every class must have
            a folder with at least one image.
        transform: Applied to each decoded PIL image.
        mode: PIL mode images are converted to on decoding (``RGB`` or ``L``).

    Raises:
        DataError: No class folders, or class folders without images.
    """

    def __init__(
        self,
        split_dir: str | Path,
        classes: Sequence[str] | None = None,
        transform: Callable[[Any], Any] | None = None,
        mode: str = "RGB",
    ) -> None:
        self.root = Path(split_dir)
        self.classes = list(classes) if classes is not None else _class_folders(self.root)
        if not self.classes:
            raise DataError(
                f"{self.root} has no class folders: put each class's images in {self.root}/<class>/ "
                "(one subfolder per class)"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.mode = mode
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            files = _image_files(self.root / name)
            if not files:
                empty.append(name)
            self.samples += [(path, label) for path in files]
        if empty:
            raise DataError(
                f"{len(empty)} class folder(s) in {self.root} have no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"{_few(empty)}; add images or remove the folder(s)"
            )
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = _decode(path, self.mode)
        return (self.transform(image) if self.transform is not None else image), label


def _image_files(folder: Path) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(parent, f)
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The train and validation datasets, transforms attached.

    Args:
        train: Yields ``(image tensor, label)``; has ``targets`` (one label per image).
        val: Yields ``(image tensor, label)`` with the evaluation transform.
        classes: Class names in label order.
    """

    train: Dataset
    val: Dataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def build_datasets(cfg: DataConfig, root: str | Path | None, resolved: ResolvedData) -> Datasets:
    """Builds the train and validation datasets described by ``cfg`` in ``root``.

    ``folder``: ``ROOT/train/<class>/*`` and the validation split ``ROOT/<cfg.val_split>``, by
    default ``ROOT/val`` if it exists, else ``ROOT/test``; both splits must have the same class
    folders. ``cifar10`` / ``cifar100``: torchvision's datasets kept in ROOT (train and test sets),
    downloaded only when ``cfg.download`` is set.

    Args:
        cfg: The recipe's data section.
        root: The dataset directory.
        resolved: Settings for the transforms (see :func:`resolve_data_config`).

    Raises:
        DataError: A one-line message saying what is missing or wrong and how to fix it.
    """
    if root is None:
        layout = "ROOT/train/<class>/<image>" if cfg.dataset == "folder" else f"the {cfg.dataset} files"
        raise DataError(f"no data directory given: pass the directory that holds {layout}")
    root = Path(root).expanduser()
    train_tf, val_tf = build_transforms(resolved, train=True), build_transforms(resolved, train=False)
    if cfg.dataset != "folder":
        return _torchvision_datasets(cfg, root, train_tf, val_tf)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist: check the path")
    if not root.is_dir():
        raise DataError(f"data directory {root} is not a directory: pass the folder that holds train/<class>/")
    if not (root / "train").is_dir():
        nested = sorted(p for p in root.iterdir() if (p / "train").is_dir())
        raise DataError(
            f"no train folder in {root}: an image folder holds train/<class>/<image> and val/<class>/<image> "
            f"(or test/<class>/<image>){f'; did you mean {nested[0]}?' if nested else ''}"
        )
    val_dir = _val_dir(root, cfg.val_split)
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(val_dir)
    if train_classes and val_classes and train_classes != val_classes:
        only_train = [c for c in train_classes if c not in val_classes]
        only_val = [c for c in val_classes if c not in train_classes]
        parts = [
            f"only in train: {_few(only_train)}" if only_train else "",
            f"only in {val_dir.name}: {_few(only_val)}" if only_val else "",
        ]
        raise DataError(
            f"class folders differ between {root / 'train'} and {val_dir} ({'; '.join(p for p in parts if p)}): "
            "both splits need the same class folders"
        )
    mode = "L" if resolved.input_size[0] == 1 else "RGB"
    train = FolderDataset(root / "train", transform=train_tf, mode=mode)
    val = FolderDataset(val_dir, classes=train.classes, transform=val_tf, mode=mode)
    return Datasets(train=train, val=val, classes=train.classes)


def _val_dir(root: Path, val_split: str | None) -> Path:
    if val_split is not None:
        if not (root / val_split).is_dir():
            with os.scandir(root) as entries:
                found = sorted(e.name for e in entries if _visible(e) and e.is_dir())
            raise DataError(
                f"validation folder {root / val_split} (data.val_split) does not exist; folders in {root}: "
                f"{_few(found) or 'none'}; fix val_split or create the folder"
            )
        return root / val_split
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise DataError(
        f"no validation folder in {root}: add val/<class>/<image> (or test/<class>/<image>) beside train/, "
        "or name another folder with data.val_split"
    )


def _torchvision_datasets(cfg: DataConfig, root: Path, train_tf: Callable, val_tf: Callable) -> Datasets:
    import torchvision.datasets

    cls_name, title, folder = _TORCHVISION[cfg.dataset]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=cfg.download)
        val = cls(str(root), train=False, transform=val_tf, download=cfg.download)
    except RuntimeError as err:
        if cfg.download:
            raise DataError(f"cannot prepare {title} in {root} ({_one_line(err)})") from err
        raise DataError(
            f"{title} not found in {root} (expected {root / folder}): set data.download: true to download it, "
            f"or pass the directory that holds {folder}"
        ) from err
    except Exception as err:  # network or archive failures while downloading
        raise DataError(
            f"downloading {title} into {root} failed ({_one_line(err)}): check the network, "
            f"or put {folder} there yourself"
        ) from err
    return Datasets(train=train, val=val, classes=list(train.classes))


def stratified_subset(targets: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded random subset of ``n`` indices that keeps every class in proportion.

    Class ``c`` with ``count_c`` of ``N`` images gets ``n * count_c / N`` images, rounded by largest
    remainder (ties to the lower label); when ``n`` is at least the number of classes, a class
    rounded to zero takes one image from the class with the most. Within each class the images are
    drawn at random, never "the first n files". A pure function of its arguments.

    Args:
        targets: The label of every image.
        n: How many indices to return; ``n >= len(targets)`` returns all of them.
        seed: Seed of the draw.

    Returns:
        The chosen indices in ascending order (the loader's sampler shuffles them).

    Raises:
        ConfigError: ``n`` is below 1.

    Example::

        >>> stratified_subset([0, 0, 0, 0, 1, 1], 3, seed=0)  # two of class 0, one of class 1
        [1, 3, 4]
    """
    if n < 1:
        raise ConfigError(f"limit_train: must be at least 1 image, got {n}")
    labels = [int(t) for t in targets]
    total = len(labels)
    if n >= total:
        return list(range(total))
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    classes = sorted(members)
    take = {c: n * len(members[c]) // total for c in classes}
    remainder = {c: n * len(members[c]) % total for c in classes}
    for c in sorted(classes, key=lambda c: (-remainder[c], c))[: n - sum(take.values())]:
        take[c] += 1
    if n >= len(classes):
        for c in sorted((c for c in classes if take[c] == 0), key=lambda c: (-remainder[c], c)):
            donor = max(classes, key=lambda d: (take[d], -d))
            take[donor] -= 1
            take[c] += 1
    rng = random.Random(seed)
    return sorted(i for c in classes for i in rng.sample(members[c], take[c]))


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys: this process's shard of the epoch's order, a pure function of (seed, epoch).

    The key carries the epoch to the dataset wrapper inside the loader (also into persistent
    worker processes), which seeds the augmentation of each sample from (seed, epoch, index).

    Args:
        indices: The dataset indices to draw from (all of them, or a subset).
        seed: Seed of the shuffle.
        shuffle: Permute the indices each epoch (train); else keep their order (val).
        rank: This process's rank.
        world_size: Number of processes; process ``rank`` takes positions ``rank, rank + world_size, ...``.
        even: Drop the last ``len(indices) % world_size`` positions so that every rank gets the same
            number of samples (train); else shards differ by at most one (val, nothing dropped).
    """

    def __init__(
        self, indices: Sequence[int], *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1, even: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.indices = list(indices)
        self.seed, self.shuffle, self.rank, self.world_size, self.even = seed, shuffle, rank, world_size, even
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch to yield, skipping its first ``start`` samples of this shard (to resume)."""
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        """This process's indices for the current epoch, in order (``start`` not applied)."""
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        if self.even:
            order = order[: len(order) - len(order) % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(index, self.epoch) for index in self.shard()[self.start :]])

    def __len__(self) -> int:
        n = len(self.indices)
        size = n // self.world_size if self.even else len(range(self.rank, n, self.world_size))
        return max(size - self.start, 0)


class _SeededDataset(Dataset):
    """Loads ``dataset[index]`` for a key ``(index, epoch)`` with the CPU generator seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


_DATA_ERROR_LINE = f"{DataError.__module__}.{DataError.__qualname__}: "


def _original_message(message: str) -> str:
    """The one-line message of a DataError that a worker re-raised as ``"Caught ...<traceback>"``."""
    lines = message.splitlines()
    for line in reversed(lines):
        if line.startswith(_DATA_ERROR_LINE):
            return line[len(_DATA_ERROR_LINE) :]
    return next((line for line in lines if line.strip()), message)


class Loader(DataLoader):
    """A ``DataLoader`` whose iterators raise a worker's :class:`DataError` with its original one-line message.

    A worker process re-raises an exception as ``type("Caught DataError in DataLoader worker ...
    <traceback>")``; this loader's iterator catches that, stops the workers and raises
    ``DataError(<the original line>)`` instead, so the engine handles one kind of error whatever
    ``num_workers`` is.
    """

    def __iter__(self) -> Iterator[Any]:
        return self._one_line_errors(super().__iter__())

    def _one_line_errors(self, batches: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from batches
        except DataError as err:
            if "\n" not in str(err):
                raise
            # Stop the workers now: torch's re-raise leaves the iterator in a reference cycle, and
            # workers finalised later by the cycle collector take seconds each to shut down.
            self._stop(batches)
            raise DataError(_original_message(str(err))) from None

    def close(self) -> None:
        """Stops persistent worker processes now; the next iteration starts new ones."""
        self._stop(getattr(self, "_iterator", None))

    def _stop(self, batches: Any) -> None:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if getattr(self, "_iterator", None) is batches:
            self._iterator = None


@dataclasses.dataclass
class Loaders:
    """The train and validation loaders of one process.

    Args:
        train: Shuffled, augmented, ``drop_last``; its sampler is an :class:`EpochSampler`.
        val: In dataset order (this process's shard when distributed), last partial batch kept.
        seed: The seed everything derives from.
    """

    train: Loader
    val: Loader
    seed: int

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch the next iteration yields; call it before every epoch.

        Args:
            epoch: The epoch number; its train order and augmentation depend only on (seed, epoch).
            start_batch: Skip the first batches of the train epoch (to resume mid-epoch); the
                remaining batches are identical to those of an uninterrupted run.
        """
        for loader, start in ((self.train, start_batch * (self.train.batch_size or 1)), (self.val, 0)):
            loader.sampler.set_epoch(epoch, start)
            loader.generator.manual_seed(mix_seed(self.seed, epoch, int(loader is self.train)))

    def close(self) -> None:
        """Stops the worker processes of both loaders (call when done; they would linger until collected)."""
        self.train.close()
        self.val.close()


def build_loaders(
    datasets: Datasets,
    batch_size: int,
    cfg: DataConfig,
    *,
    seed: int,
    limit_train: int | None = None,
    distributed: bool = False,
    device_type: str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
) -> Loaders:
    """Builds this process's train and validation loaders (see the module docstring for the contract).

    Args:
        datasets: From :func:`build_datasets` (or any pair of datasets; ``train.targets`` is needed
            with ``limit_train``).
        batch_size: Images per batch in this process.
        cfg: The recipe's data section (``workers``, ``pin_memory``).
        seed: Seed of the subset, the epoch orders and the augmentation.
        limit_train: Train on a :func:`stratified_subset` of this many images.
        distributed: Shard both loaders across processes.
        device_type: Where batches go; memory is pinned only for ``cuda``.
        rank: This process's rank; by default ``torch.distributed.get_rank()`` when distributed, else 0.
        world_size: Number of processes; by default from ``torch.distributed`` when distributed, else 1.

    Returns:
        The loaders, set to epoch 0.

    Raises:
        ConfigError: ``batch_size`` or ``limit_train`` below 1.
        DataError: The train shard holds fewer images than one batch.
    """
    check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    if distributed and (rank is None or world_size is None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "build_loaders(distributed=True) needs an initialised process group or rank and world_size"
            )
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = (rank or 0, world_size or 1) if distributed else (0, 1)
    indices: Sequence[int] = range(len(datasets.train))
    if limit_train is not None:
        targets = getattr(datasets.train, "targets", None)
        if targets is None:
            raise TypeError("limit_train needs a train dataset with a 'targets' attribute (one label per image)")
        indices = stratified_subset(targets, limit_train, seed)
    train_sampler = EpochSampler(indices, seed=seed, shuffle=True, rank=rank, world_size=world_size, even=True)
    if len(train_sampler) < batch_size:
        where = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise DataError(
            f"the train set has {len(train_sampler)} image(s){where}, fewer than one batch of {batch_size}: "
            "lower the batch size or add images"
        )
    val_sampler = EpochSampler(
        range(len(datasets.val)), seed=seed, shuffle=False, rank=rank, world_size=world_size, even=False
    )
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": cfg.workers,
        "pin_memory": cfg.pin_memory and device_type == "cuda",
        "persistent_workers": cfg.workers > 0,
    }
    loaders = Loaders(
        train=Loader(
            _SeededDataset(datasets.train, seed),
            sampler=train_sampler,
            drop_last=True,
            generator=torch.Generator(),
            **common,
        ),
        val=Loader(
            _SeededDataset(datasets.val, seed),
            sampler=val_sampler,
            drop_last=False,
            generator=torch.Generator(),
            **common,
        ),
        seed=seed,
    )
    loaders.set_epoch(0)
    return loaders
