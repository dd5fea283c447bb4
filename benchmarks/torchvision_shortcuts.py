"""Post-hoc shortcuts on torchvision blocks: does ``policy.shortcuts=bireal`` help a torchvision ResNet-18?

A proxy for the ``imagenet-resnet18-posthoc`` recipe, which cannot be measured without ImageNet: a
torchvision ResNet-18 (ImageNet stem, 10 classes) is first trained in float on a seeded
10,000-image CIFAR-10 subset at 32x32 (8 epochs, Adam 2e-3, everything kept float), then binarized
post-hoc with the ``cifar10-resnet20-posthoc`` recipe's settings, without and with Bi-Real
shortcuts (3 epochs each, distillation from the float model), and with the calibrated activation
thresholds of the CIFAR recipe (its block reconstruction does not apply: torchvision's BasicBlock
calls one ``relu`` twice). Top-1 on the full test split after every epoch.

Run: ``python benchmarks/torchvision_shortcuts.py --data <extracted CIFAR-10 folder>`` (about 17
minutes on 2 CPU cores). Extract the folder with ``tests/_shared_data.py:extract_cifar10``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import binarize
from binarize.engine.progress import Reporter
from binarize.recipes import load_recipe

RECIPE = "cifar10-resnet20-posthoc"
# The CIFAR recipe's settings before its recovery options: block reconstruction needs block-boundary
# modules called once per forward, and torchvision's BasicBlock calls its one ``relu`` twice.
BEFORE_RECOVERY = [
    "block_reconstruction.fraction=0",
    "layer.activation_bias=false",
    "train.calibrate_thresholds=false",
    "train.bn_refresh_batches=0",
]
BIREAL = ["policy.shortcuts=bireal", "policy.shortcut_downsample=avgpool_conv"]
SHARED = ["policy.shortcuts=bireal", "policy.shortcut_downsample=shared"]
VARIANTS = {
    "no shortcuts + distill": [*BEFORE_RECOVERY, "policy.shortcuts=none"],
    "bireal (avgpool_conv) + distill": [*BEFORE_RECOVERY, *BIREAL],
    "bireal + distill + calibrated thresholds": [
        *BEFORE_RECOVERY,
        *BIREAL,
        "layer.activation_bias=true",
        "train.calibrate_thresholds=true",
    ],
    "bireal (shared downsample) + distill": [*BEFORE_RECOVERY, *SHARED],
    "bireal (shared downsample) + distill + calibrated thresholds": [
        *BEFORE_RECOVERY,
        *SHARED,
        "layer.activation_bias=true",
        "train.calibrate_thresholds=true",
    ],
    "no shortcuts + distill + calibrated thresholds": [
        *BEFORE_RECOVERY,
        "policy.shortcuts=none",
        "layer.activation_bias=true",
        "train.calibrate_thresholds=true",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an extracted CIFAR-10 folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/binarize-bench"), help="where the float weights go")
    parser.add_argument("--limit", type=int, default=10_000, help="training images")
    parser.add_argument("--float-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each binary fine-tune")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = [
        "model.spec=torchvision:resnet18",
        "model.num_classes=10",
        f"train.limit_train={args.limit}",
        f"data.workers={args.workers}",
    ]
    float_run = [
        "model.weights=null",
        "model.pretrained=false",
        "policy.keep=['re:.*']",
        "distill.teacher=none",
        *BEFORE_RECOVERY,
        f"epochs={args.float_epochs}",
        "optimizer.lr=0.002",
    ]
    start = time.perf_counter()
    result = binarize.finetune(None, load_recipe(RECIPE, base + float_run), data_dir=args.data, reporter=Reporter())
    print(f"float: {[round(r['val_top1'], 2) for r in result.history]} ({(time.perf_counter() - start) / 60:.1f} min)")
    args.work.mkdir(parents=True, exist_ok=True)
    weights = args.work / "torchvision-resnet18-cifar-float.pt"
    torch.save(result.model.state_dict(), weights)

    for name in args.variants:
        overrides = VARIANTS[name]
        start = time.perf_counter()
        recipe = load_recipe(RECIPE, base + [f"model.weights={weights}", f"epochs={args.epochs}", *overrides])
        result = binarize.finetune(None, recipe, data_dir=args.data, reporter=Reporter())
        per_epoch = [round(r["val_top1"], 2) for r in result.history]
        print(f"{name}: after conversion, then per epoch {per_epoch} ({(time.perf_counter() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
