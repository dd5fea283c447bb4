"""Evaluation: top-1, top-5 and loss of a model over a loader, and of a saved binarize file on a dataset."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize.config import check
from binarize.data import DataConfig, Loader, build_eval_dataset, build_eval_loader, resolve_data_config
from binarize.engine.distributed import DistContext, all_reduce_sum
from binarize.engine.losses import top_k_correct
from binarize.files import load, run_record

__all__ = ["autocast_dtype", "evaluate", "evaluate_file", "to_device"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: full precision)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` (asynchronously from pinned memory), images channels-last if asked."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy and image count over a loader (summed over processes).

    The sums stay on the device until the end: one host read per evaluation.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = top_k_correct(logits, labels)
        sums[0] += loss.double()
        sums[1] += top1
        sums[2] += top5
        sums[3] += labels.shape[0]
    all_reduce_sum(sums, ctx or DistContext())
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count, "images": int(count)}


def eval_loader(
    model: nn.Module,
    data_dir: str | Path,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | None = None,
    limit: int | None = None,
) -> Loader:
    """The evaluation split of ``data_dir`` (``val/`` or ``test/`` alone), prepared for ``model``.

    The images are prepared as in the run that wrote the model (its run record's data settings, and
    its classes checked against the folders), else from the model's defaults.

    Args:
        model: A model from :func:`binarize.load` (or any model: then its timm defaults are used).
        data_dir: The dataset directory.
        batch_size: Images per batch.
        workers: Loader worker processes; 0 loads in the main process.
        device: Where the batches go (pinned memory for CUDA).
        limit: A seeded, class-balanced subset of this many images.
    """
    cfg = DataConfig(workers=workers)
    run = run_record(model)
    resolved = run.data if run is not None and run.data is not None else resolve_data_config(cfg, model)
    classes = list(run.classes) if run is not None and run.classes else None
    dataset = build_eval_dataset(cfg, data_dir, resolved, classes=classes)
    device_type = device.type if device is not None else "cpu"
    return build_eval_loader(dataset, batch_size, workers=workers, limit=limit, device_type=device_type)


def evaluate_file(
    path: str | Path,
    data_dir: str | Path,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluates a saved binarize file on the evaluation split of an image folder.

    The images are prepared as in the run that wrote the file (the data settings it records), else
    from the model's own defaults (its ``pretrained_cfg``). Only the evaluation split is read
    (``DATA_DIR/val``, else ``DATA_DIR/test``): no ``train/`` folder is needed. When the file records
    the class names it was trained on, the split's class folders must be the same.

    Args:
        path: A ``.safetensors`` file written by :func:`binarize.save` or by a fine-tuning run.
        data_dir: The dataset directory.
        batch_size: Images per batch.
        workers: Loader worker processes; 0 loads in the main process.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        limit: Evaluate a seeded, class-balanced subset of this many images: the one a run with
            ``train.limit_val`` of the same size validated on.

    Returns:
        ``{"top1", "top5", "loss", "images"}``: top-1 and top-5 in percent, the mean cross-entropy
        and the number of images (in full precision).

    Raises:
        BinarizeError: A one-line message for a missing or foreign file, a missing split, classes
            that differ from the file's, or a bad option.

    Example::

        >>> binarize.evaluate_file("runs/r20/best.safetensors", "cifar10", workers=0)["top1"]
    """
    check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    target = DistContext().device(device)
    model = load(path, device=target)
    loader = eval_loader(model, data_dir, batch_size=batch_size, workers=workers, device=target, limit=limit)
    try:
        return evaluate(model, loader, target, autocast_dtype("fp32", target))
    finally:
        loader.close()
