"""The data pipeline of the fine-tuning engine: recipe ``data:`` section, transforms, datasets, loaders.

Flow, one function per step (one module per concern: ``config``, ``transforms``, ``datasets``,
``sampling``, ``loaders``; ``constants`` holds the normalisation statistics)::

    DataConfig (recipe) + float model --resolve_data_config--> ResolvedData
    ResolvedData --build_transforms--> train / eval transforms
    DataConfig + root + ResolvedData --build_datasets--> Datasets (train, val, classes)
    Datasets --build_loaders--> Loaders (train, val; set_epoch)
    DataConfig + root + ResolvedData --build_eval_dataset--> the validation split alone --build_eval_loader--> Loader

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

Evaluating a saved model needs only the evaluation split: :func:`build_eval_dataset` reads
``ROOT/val`` (or ``ROOT/test``, or ``data.val_split``) and never looks for ``ROOT/train``.

**Reproducibility.** The train order of an epoch is a pure function of ``(seed, epoch)``, and so is
the augmentation: before loading sample ``i`` of epoch ``e`` the CPU random generator is seeded
with ``mix_seed(seed, e, i)`` and restored afterwards. So batches do not depend on the number of
workers, on earlier epochs or on anything else the process did, and resuming at epoch ``e`` (batch
``k``) with :meth:`Loaders.set_epoch` reproduces the remaining batches bit for bit. Iterating a
loader never draws from the global torch generator (each loader has its own ``generator``). The
engine still owns the RNG state of the model (dropout) and the optimizer.

**Subsets.** ``limit_train`` trains on a seeded, class-balanced subset (:func:`stratified_subset`,
drawn with the run's seed); ``limit_val`` validates on one drawn with :data:`VAL_SUBSET_SEED`, the
same images whatever the run's seed. A limit above the size of its split is a
:class:`~binarize.errors.ConfigError` (it would silently mean "all of them").

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

from binarize.data.config import DataConfig, ResolvedData, resolve_data_config
from binarize.data.constants import IMAGENET_MEAN, IMAGENET_STD
from binarize.data.datasets import IMAGE_EXTENSIONS, Datasets, FolderDataset, build_datasets, build_eval_dataset
from binarize.data.loaders import Loader, Loaders, build_eval_loader, build_loaders
from binarize.data.sampling import VAL_SUBSET_SEED, EpochSampler, stratified_subset
from binarize.data.transforms import build_transforms

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VAL_SUBSET_SEED",
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
    "build_eval_dataset",
    "stratified_subset",
    "build_loaders",
    "build_eval_loader",
]
