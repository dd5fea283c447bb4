"""Post-hoc binarization of the pretrained CIFAR-10 ResNet-20: which settings recover accuracy fastest.

Uses the real pretrained ResNet-20 (../shared/models) and the CIFAR-10 JPEG folders (../shared/data;
a lossy copy: compare these numbers with each other, never with published CIFAR-10 figures). Prints
the float model's test accuracy, the binary model's right after conversion and BatchNorm
re-estimation, and after the same budget (default: 5 epochs of a class-balanced 10,000-image subset,
batch 64) for each variant:

* the ablation (``--variants`` default): the recipe, the recipe with each recovery option turned off
  alone (block reconstruction, calibrated activation thresholds, BatchNorm refresh), and the recipe
  before the recovery options;
* further variants of the recipe before the recovery options: ``hardtanh`` (activations feeding binary
  convs become Hardtanh, no extra shortcuts) with labels only, ``bireal`` (plus a real-valued
  shortcut around every binary conv) with and without distillation, and ``scratch`` (the binary
  network from random weights, labels only: there is no trained float model to distil from).

Then the chosen post-hoc recipe (``cifar10-resnet20-posthoc``) on all 50,000 training images.

Run: ``python benchmarks/cifar_posthoc.py --threads 1 --data DIR`` (about 15 minutes per variant on one
quiet core, then about 35 for the full-data run; ``--full-epochs 0`` skips it);
``--quick`` checks the script in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import binarize
from binarize.engine.progress import Reporter
from binarize.recipes import load_recipe
from binarize.runtime.machine import machine_line as runtime_machine_line

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHECKPOINT = SHARED / "models" / "cifar10-resnet20-12fca82f.th"
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
RECIPE = "cifar10-resnet20-posthoc"

BEFORE_RECOVERY = [
    "block_reconstruction.fraction=0",
    "layer.activation_bias=false",
    "train.calibrate_thresholds=false",
    "train.bn_refresh_batches=0",
]
"""Overrides that turn the recipe back into the one before the recovery options (docs/finetune.md)."""

VARIANTS = {
    # the ablation: the recipe, and each recovery option turned off alone
    "recipe": [],
    "without block reconstruction": ["block_reconstruction.fraction=0"],
    "without calibrated thresholds": ["layer.activation_bias=false", "train.calibrate_thresholds=false"],
    "without BN refresh": ["train.bn_refresh_batches=0"],
    "before the recovery options": BEFORE_RECOVERY,
    # options that did not make it into the recipe (docs/benchmarks.md), each added to it
    "plus feature distillation": ["feature_distill.weight=1", "feature_distill.layers=[layer*.*.relu2]"],
    "plus tau 1 (no clamp)": ["method.tau_min=1.0", "method.tau_max=1.0"],
    # the topology and distillation comparisons, on the recipe before the recovery options
    "hardtanh, labels only": [*BEFORE_RECOVERY, "distill.teacher=none"],
    "bireal + distill": [*BEFORE_RECOVERY, "policy.shortcuts=bireal"],
    "bireal, labels only": [*BEFORE_RECOVERY, "policy.shortcuts=bireal", "distill.teacher=none"],
    "scratch (hardtanh, labels only)": [*BEFORE_RECOVERY, "distill.teacher=none", "model.weights=null"],
}
ABLATION = ["recipe", "without block reconstruction", "without calibrated thresholds", "without BN refresh",
            "before the recovery options"]  # fmt: skip


def machine_line() -> str:
    return f"machine: {runtime_machine_line()}; binarize {binarize.__version__}; python {platform.python_version()}"


def extract(dest: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from _shared_data import extract_cifar10

    return Path(extract_cifar10(dest))


def run(overrides: list[str], data: Path, output: Path) -> dict:
    recipe = load_recipe(RECIPE, [f"model.weights={CHECKPOINT}", *overrides])
    start = time.perf_counter()
    result = binarize.finetune(None, recipe, data_dir=data, output_dir=output, reporter=Reporter())
    return {
        "after_conversion": result.history[0]["val_top1"],
        "final": result.history[-1]["val_top1"],
        "best": result.best["val_top1"],
        "per_epoch": [round(r["val_top1"], 2) for r in result.history],
        "train_images_per_s": sum(r["images_per_s"] or 0 for r in result.history[1:]) / max(1, len(result.history) - 1),
        "minutes": (time.perf_counter() - start) / 60,
        "epoch_seconds": [round(r["seconds"], 1) for r in result.history[1:]],
        "diagnostics": diagnostics_by_epoch(output / "diagnostics.jsonl"),
    }


def diagnostics_by_epoch(path: Path) -> dict[int, dict[str, float]]:
    """Per epoch, the mean over the binary layers of the figures that explain a run (docs/diagnostics.md)."""
    keys = ("clipped", "flip_rate", "changed_from_start", "saturation", "quant_error")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    out: dict[int, dict[str, float]] = {}
    for epoch in sorted({r["epoch"] for r in rows}):
        layers = [r for r in rows if r["epoch"] == epoch]
        out[epoch] = {
            k: round(sum(r[k] for r in layers if r[k] is not None) / len(layers), 4)
            for k in keys
            if any(r[k] is not None for r in layers)
        }
    return out


def describe(diagnostics: dict[int, dict[str, float]]) -> str:
    return "; ".join(
        f"ep {e}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()) for e, figures in diagnostics.items()
    )


def float_accuracy(data: Path) -> float:
    from binarize.data import DataConfig, build_datasets, build_loaders, resolve_data_config

    model = binarize.create_model("cifar_resnet20", weights=CHECKPOINT)
    cfg = DataConfig(workers=2)
    resolved = resolve_data_config(cfg, model)
    loaders = build_loaders(build_datasets(cfg, data, resolved), 256, cfg, seed=0)
    try:
        return binarize.evaluate(model, loaders.val, torch.device("cpu"))["top1"]
    finally:
        loaders.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/binarize-bench"), help="extraction and run folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=10_000, help="training images per variant")
    parser.add_argument("--variants", nargs="*", default=ABLATION, help=f"variants to run, of: {', '.join(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per run")
    parser.add_argument("--full-epochs", type=int, default=3, help="epochs of the full-data run (0 skips it)")
    parser.add_argument("--quick", action="store_true", help="1 epoch of 1,000 images, no full run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (run two variant subsets side by side with 1)"
    )
    parser.add_argument("--data", type=Path, help="an extracted CIFAR-10 folder (default: extract into --work)")
    args = parser.parse_args()
    if not CHECKPOINT.exists() or not ARCHIVE.exists():
        print(f"skipped: needs {CHECKPOINT} and {ARCHIVE}")
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.limit, args.full_epochs = 1, 1000, 0
    print(machine_line(), flush=True)
    data = args.data or extract(args.work / "cifar10")
    results: dict = {"float_top1": float_accuracy(data)}
    print(f"float ResNet-20 on the JPEG test split: {results['float_top1']:.2f}%", flush=True)
    budget = [f"epochs={args.epochs}", f"train.limit_train={args.limit}", f"data.workers={args.workers}"]
    runs = args.work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    for name in args.variants:
        results[name] = run(budget + VARIANTS[name], data, runs / name.replace(" ", "-").replace(",", ""))
        r = results[name]
        print(
            f"{name:32s} after conversion {r['after_conversion']:6.2f}%  after {args.epochs} epochs of "
            f"{args.limit} images {r['final']:6.2f}% (best {r['best']:.2f}%)  {r['train_images_per_s']:.0f} img/s  "
            f"{r['minutes']:.1f} min  per epoch {r['per_epoch']}  train s/epoch {r['epoch_seconds']}\n"
            f"    diagnostics (mean over layers): {describe(r['diagnostics'])}",
            flush=True,
        )
    if args.full_epochs:
        full = run([f"epochs={args.full_epochs}", f"data.workers={args.workers}"], data, runs / "full")
        results["recipe on 50,000 images"] = full
        print(
            f"{RECIPE} on all 50,000 images, {args.full_epochs} epochs: {full['final']:.2f}% "
            f"(best {full['best']:.2f}%)  per epoch {full['per_epoch']}  {full['minutes']:.1f} min",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
