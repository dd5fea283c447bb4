"""Which images an epoch sees, in which order: class-balanced subsets, the epoch sampler, seeded loading.

The train order of an epoch is a pure function of ``(seed, epoch)``, and so is the augmentation:
before loading sample ``i`` of epoch ``e`` the CPU random generator is seeded with
``mix_seed(seed, e, i)`` and restored afterwards (:class:`_SeededDataset`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from binarize._utils import mix_seed
from binarize.errors import ConfigError

__all__ = ["VAL_SUBSET_SEED", "EpochSampler", "stratified_subset"]

VAL_SUBSET_SEED = 0
"""Seed of the validation subset (``train.limit_val``, ``evaluate_file(limit=...)``): the same images whatever
the run's seed, so that runs with different seeds, and a file evaluated later, are compared on the same images."""


def stratified_subset(targets: Sequence[int], n: int, seed: int, *, field: str = "limit_train") -> list[int]:
    """A seeded random subset of ``n`` indices that keeps every class in proportion.

    Class ``c`` with ``count_c`` of ``N`` images gets ``n * count_c / N`` images, rounded by largest
    remainder (ties to the lower label); when ``n`` is at least the number of classes, a class
    rounded to zero takes one image from the class with the most. Within each class the images are
    drawn at random, never "the first n files". A pure function of its arguments.

    Args:
        targets: The label of every image.
        n: How many indices to return; ``n >= len(targets)`` returns all of them.
        seed: Seed of the draw.
        field: The setting ``n`` comes from, named in the error.

    Returns:
        The chosen indices in ascending order (the loader's sampler shuffles them).

    Raises:
        ConfigError: ``n`` is below 1.

    Example::

        >>> stratified_subset([0, 0, 0, 0, 1, 1], 3, seed=0)  # two of class 0, one of class 1
        [1, 3, 4]
    """
    if n < 1:
        raise ConfigError(f"{field}: must be at least 1 image, got {n}")
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
