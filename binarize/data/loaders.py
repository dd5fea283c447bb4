"""Loaders: the train and validation loaders of a run, the evaluation loader of a file, one-line worker errors.

With ``workers > 0`` both loaders of a run keep their worker processes between epochs
(``persistent_workers``) until :meth:`Loaders.close`; torch runs each worker with one intra-op
thread. Memory is pinned only for ``device_type == "cuda"``. Every object a worker needs is
picklable, so the ``spawn`` and ``forkserver`` start methods work too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from binarize._utils import mix_seed
from binarize.config import check
from binarize.data.config import DataConfig
from binarize.data.datasets import Datasets
from binarize.data.sampling import VAL_SUBSET_SEED, EpochSampler, _SeededDataset, stratified_subset
from binarize.errors import ConfigError, DataError

__all__ = ["Loader", "Loaders", "build_loaders", "build_eval_loader"]

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
    limit_val: int | None = None,
    distributed: bool = False,
    device_type: str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
) -> Loaders:
    """Builds this process's train and validation loaders (see :mod:`binarize.data` for the contract).

    Args:
        datasets: From :func:`~binarize.data.build_datasets` (or any pair of datasets; ``train.targets``
            is needed with ``limit_train``, ``val.targets`` with ``limit_val``).
        batch_size: Images per batch in this process.
        cfg: The recipe's data section (``workers``, ``pin_memory``).
        seed: Seed of the train subset, the epoch orders and the augmentation.
        limit_train: Train on a :func:`~binarize.data.stratified_subset` of this many images.
        limit_val: Validate on a stratified subset of this many images, drawn with
            :data:`~binarize.data.VAL_SUBSET_SEED` (the same images whatever ``seed``).
        distributed: Shard both loaders across processes.
        device_type: Where batches go; memory is pinned only for ``cuda``.
        rank: This process's rank; by default ``torch.distributed.get_rank()`` when distributed, else 0.
        world_size: Number of processes; by default from ``torch.distributed`` when distributed, else 1.

    Returns:
        The loaders, set to epoch 0.

    Raises:
        ConfigError: ``batch_size`` below 1, or a limit below 1 or above the size of its split.
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
    indices = _subset_indices(datasets.train, limit_train, seed, field="limit_train", split="train")
    train_sampler = EpochSampler(indices, seed=seed, shuffle=True, rank=rank, world_size=world_size, even=True)
    if len(train_sampler) < batch_size:
        where = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise DataError(
            f"the train set has {len(train_sampler)} image(s){where}, fewer than one batch of {batch_size}: "
            "lower the batch size or add images"
        )
    val_indices = _subset_indices(datasets.val, limit_val, VAL_SUBSET_SEED, field="limit_val", split="validation")
    val_sampler = EpochSampler(val_indices, seed=seed, shuffle=False, rank=rank, world_size=world_size, even=False)
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


def build_eval_loader(
    dataset: Dataset, batch_size: int, *, workers: int = 2, limit: int | None = None, device_type: str = "cpu"
) -> Loader:
    """A loader over an evaluation split in dataset order (the same batches as a run's validation loader).

    Args:
        dataset: From :func:`~binarize.data.build_eval_dataset` (``targets`` is needed with ``limit``).
        batch_size: Images per batch.
        workers: Loader worker processes; 0 loads in the main process.
        limit: Evaluate a stratified subset of this many images, the one ``train.limit_val`` draws.
        device_type: Where batches go; memory is pinned only for ``cuda``.

    Raises:
        ConfigError: ``batch_size`` or ``limit`` below 1, ``limit`` above the size of the split, or
            ``workers`` below 0.
    """
    check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    check(workers >= 0, "workers", f"must be >= 0 (0 loads in the main process), got {workers}")
    indices = _subset_indices(dataset, limit, VAL_SUBSET_SEED, field="limit", split="evaluation")
    sampler = EpochSampler(indices, seed=VAL_SUBSET_SEED, shuffle=False, even=False)
    return Loader(
        _SeededDataset(dataset, VAL_SUBSET_SEED),
        sampler=sampler,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device_type == "cuda",
        generator=torch.Generator(),
    )


def _subset_indices(dataset: Dataset, limit: int | None, seed: int, *, field: str, split: str) -> Sequence[int]:
    """All indices of ``dataset``, or a :func:`~binarize.data.stratified_subset` of ``limit`` of them.

    Args:
        dataset: The split (it needs ``targets`` when ``limit`` is given).
        limit: How many images to keep; None keeps all.
        seed: Seed of the draw.
        field: The setting ``limit`` comes from, named in errors.
        split: The split's name in errors (``train``, ``validation``).

    Raises:
        ConfigError: ``limit`` is below 1 or above the number of images.
    """
    if limit is None:
        return range(len(dataset))
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{field} needs a {split} dataset with a 'targets' attribute (one label per image)")
    if limit > len(targets):
        raise ConfigError(
            f"{field}: {limit} is more than the {len(targets)} images of the {split} split; "
            f"lower it, or remove it to use all of them"
        )
    return stratified_subset(targets, limit, seed, field=field)
