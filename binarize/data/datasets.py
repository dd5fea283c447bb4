"""Datasets: image-folder splits, torchvision's CIFAR, the train/validation pair and the evaluation split alone."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from binarize.data.config import DataConfig, ResolvedData
from binarize.data.transforms import build_transforms
from binarize.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset", "Datasets", "build_datasets", "build_eval_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "CIFAR-100", "cifar-100-python"),
}


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
        resolved: Settings for the transforms (see :func:`~binarize.data.resolve_data_config`).

    Raises:
        DataError: A one-line message saying what is missing or wrong and how to fix it.
    """
    root = _data_root(cfg, root, "train")
    train_tf, val_tf = build_transforms(resolved, train=True), build_transforms(resolved, train=False)
    if cfg.dataset != "folder":
        train = _torchvision_split(cfg, root, True, train_tf)
        return Datasets(train=train, val=_torchvision_split(cfg, root, False, val_tf), classes=list(train.classes))
    if not (root / "train").is_dir():
        nested = sorted(p for p in root.iterdir() if (p / "train").is_dir())
        raise DataError(
            f"no train folder in {root}: an image folder holds train/<class>/<image> and val/<class>/<image> "
            f"(or test/<class>/<image>){f'; did you mean {nested[0]}?' if nested else ''}"
        )
    val_dir = _val_dir(root, cfg.val_split)
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(val_dir)
    if train_classes and val_classes and train_classes != val_classes:
        raise DataError(
            f"class folders differ between {root / 'train'} and {val_dir} "
            f"({_class_difference(train_classes, val_classes, 'train', val_dir.name)}): "
            "both splits need the same class folders"
        )
    mode = _mode(resolved)
    train = FolderDataset(root / "train", transform=train_tf, mode=mode)
    val = FolderDataset(val_dir, classes=train.classes, transform=val_tf, mode=mode)
    return Datasets(train=train, val=val, classes=train.classes)


def build_eval_dataset(
    cfg: DataConfig, root: str | Path | None, resolved: ResolvedData, classes: Sequence[str] | None = None
) -> Dataset:
    """The validation split of ``root`` alone, with the evaluation transform: no train split is needed or read.

    ``folder``: ``ROOT/<cfg.val_split>``, by default ``ROOT/val`` if it exists, else ``ROOT/test``.
    ``cifar10`` / ``cifar100``: torchvision's test set.

    Args:
        cfg: The data section (``dataset``, ``val_split``, ``download``).
        root: The dataset directory.
        resolved: Settings for the evaluation transform.
        classes: The class names a model was trained on, in label order (a binarize file records
            them); the split's classes must be the same.

    Returns:
        A dataset of ``(image tensor, label)`` with ``classes`` and ``targets`` attributes.

    Raises:
        DataError: The split is missing or empty, or its classes differ from ``classes``.
    """
    root = _data_root(cfg, root, "val")
    if cfg.dataset != "folder":
        dataset = _torchvision_split(cfg, root, False, build_transforms(resolved, train=False))
        found = list(dataset.classes)
        val_dir = root
    else:
        val_dir = _val_dir(root, cfg.val_split)
        found = _class_folders(val_dir)
    if classes is not None and found and list(classes) != found:
        raise DataError(
            f"the class folders of {val_dir} differ from those the model was trained on ({len(classes)} classes; "
            f"{_class_difference(list(classes), found, 'the model', val_dir.name)}): "
            "evaluate on a split with the same classes"
        )
    if cfg.dataset != "folder":
        return dataset
    return FolderDataset(val_dir, transform=build_transforms(resolved, train=False), mode=_mode(resolved))


def _mode(resolved: ResolvedData) -> str:
    return "L" if resolved.input_size[0] == 1 else "RGB"


def _class_difference(first: Sequence[str], second: Sequence[str], first_name: str, second_name: str) -> str:
    only_first = [c for c in first if c not in second]
    only_second = [c for c in second if c not in first]
    parts = [
        f"only in {first_name}: {_few(only_first)}" if only_first else "",
        f"only in {second_name}: {_few(only_second)}" if only_second else "",
    ]
    return "; ".join(p for p in parts if p) or "the same names in another order"


def _data_root(cfg: DataConfig, root: str | Path | None, split: str) -> Path:
    """The checked dataset directory; ``split`` names the folder the caller needs (``train``, ``val``)."""
    if root is None:
        layout = f"ROOT/{split}/<class>/<image>" if cfg.dataset == "folder" else f"the {cfg.dataset} files"
        raise DataError(f"no data directory given: pass the directory that holds {layout}")
    root = Path(root).expanduser()
    if cfg.dataset != "folder":
        return root
    if not root.exists():
        raise DataError(f"data directory {root} does not exist: check the path")
    if not root.is_dir():
        raise DataError(f"data directory {root} is not a directory: pass the folder that holds {split}/<class>/")
    return root


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
        f"no validation folder in {root}: add val/<class>/<image> (or test/<class>/<image>), "
        "or name another folder with data.val_split"
    )


def _torchvision_split(cfg: DataConfig, root: Path, train: bool, transform: Callable) -> Dataset:
    """torchvision's CIFAR-10/100 train or test set in ``root``; every failure is one line."""
    import torchvision.datasets

    cls_name, title, folder = _TORCHVISION[cfg.dataset]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(str(root), train=train, transform=transform, download=cfg.download)
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
