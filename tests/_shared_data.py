"""Access for tests to the shared data beside the project (``../shared``), skipping cleanly where it is absent.

``extract_cifar10`` unpacks (part of) the CIFAR-10 JPEG image folders into a test's directory,
once: a second call with the same arguments returns the existing copy.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

__all__ = ["SHARED", "CIFAR10_ARCHIVE", "CIFAR10_CLASSES", "requires_shared_data", "extract_cifar10"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

requires_shared_data = pytest.mark.skipif(
    not CIFAR10_ARCHIVE.is_file(), reason=f"shared data not found: {CIFAR10_ARCHIVE} is absent"
)


def extract_cifar10(dest: str | Path, per_class: int | None = None, splits: Sequence[str] = ("train", "test")) -> Path:
    """Extracts CIFAR-10 image folders from the shared archive, cached.

    Args:
        dest: Directory to extract into (created if needed).
        per_class: Keep the images numbered below this in each class folder (the first ones of
            each class); None keeps all (5,000 train and 1,000 test images per class).
        splits: Which of ``train`` and ``test`` to extract.

    Returns:
        The dataset root, holding ``<split>/<class>/NNNN.jpg`` for each split asked for. Its name
        encodes the arguments, so different subsets can share ``dest``.

    Raises:
        pytest.skip.Exception: The archive is absent.
    """
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"shared data not found: {CIFAR10_ARCHIVE} is absent")
    wanted = tuple(sorted(set(splits)))
    root = Path(dest) / f"cifar10-{'all' if per_class is None else per_class}-{'-'.join(wanted)}"
    if root.is_dir():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(CIFAR10_ARCHIVE) as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[0] != "cifar10" or parts[1] not in wanted:
                continue
            split, label, filename = parts[1:]
            if label not in CIFAR10_CLASSES or not filename.endswith(".jpg"):
                continue
            if per_class is not None and int(filename.removesuffix(".jpg")) >= per_class:
                continue
            target = partial / split / label / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
    os.replace(partial, root)
    return root
