"""Engine throughput: a binary fine-tune against a float fine-tune of the same model and data pipeline.

Runs the ``cifar10-resnet20-posthoc`` recipe (distillation included) for one epoch on a subset of
the CIFAR-10 JPEG folders twice: once as is, once with a policy that keeps every layer float, and
measures the loader alone over the same epoch. If the loader is much faster than both runs, it is
not the bottleneck, and the binary/float ratio is the cost of the binary layers in a real fine-tune.

Run: ``python benchmarks/engine_throughput.py [--limit 5000] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import binarize
from binarize.data import build_datasets, build_loaders, resolve_data_config
from binarize.engine.progress import Reporter
from binarize.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_posthoc import ARCHIVE, CHECKPOINT, extract, machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/binarize-bench"))
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not CHECKPOINT.exists() or not ARCHIVE.exists():
        print(f"skipped: needs {CHECKPOINT} and {ARCHIVE}")
        return
    torch.set_num_threads(2)
    print(machine_line(), flush=True)
    data = extract(args.work / "cifar10")
    common = [
        f"model.weights={CHECKPOINT}",
        "epochs=1",
        f"batch_size={args.batch}",
        f"train.limit_train={args.limit}",
        f"data.workers={args.workers}",
        "train.bn_calibration_batches=0",
    ]
    recipe = load_recipe("cifar10-resnet20-posthoc", common)
    model = binarize.create_model("cifar_resnet20", weights=CHECKPOINT)
    resolved = resolve_data_config(recipe.data, model)
    loaders = build_loaders(
        build_datasets(recipe.data, data, resolved), args.batch, recipe.data, seed=0, limit_train=args.limit
    )
    start, images = time.perf_counter(), 0
    for batch, _ in loaders.train:
        images += batch.shape[0]
    loader_rate = images / (time.perf_counter() - start)
    loaders.close()
    print(f"loader alone: {loader_rate:.0f} img/s ({args.workers} workers)", flush=True)
    rates = {}
    for name, extra in (("float", ["policy.keep=['re:.*']"]), ("binary", [])):
        result = binarize.finetune(None, load_recipe("cifar10-resnet20-posthoc", common + extra), data_dir=data,
                                   reporter=Reporter())  # fmt: skip
        rates[name] = result.history[-1]["images_per_s"]
        binary = binarize.inspect(result.model).to_dict()["summary"]["binary_convs"]
        print(f"{name} fine-tune ({binary} binary convs): {rates[name]:.0f} img/s", flush=True)
    print(f"binary/float images per second: {rates['binary'] / rates['float']:.3f}; "
          f"loader/binary: {loader_rate / rates['binary']:.1f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
