"""Training time per epoch of the post-hoc recipe against the recipe before the recovery options.

Runs, in interleaved rounds in one process, one epoch of the same class-balanced subset of the
CIFAR-10 JPEG training images with each variant and reports the training seconds of the epoch (the
engine's ``seconds``: the training loop only, BatchNorm refresh included; not the conversion, the
calibration or the validation) and their ratio to the first variant.

Run: ``python benchmarks/recovery_timing.py --data DIR --limit 2000 --rounds 3`` (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import binarize
from binarize.engine.progress import Reporter
from binarize.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_posthoc import BEFORE_RECOVERY, CHECKPOINT, RECIPE, machine_line  # noqa: E402

VARIANTS = {
    "before the recovery options": BEFORE_RECOVERY,
    "cifar10-resnet20-posthoc": [],
}


def epoch_seconds(overrides: list[str], data: Path, limit: int, workers: int) -> float:
    recipe = load_recipe(
        RECIPE,
        [
            f"model.weights={CHECKPOINT}",
            "epochs=1",
            f"train.limit_train={limit}",
            f"data.workers={workers}",
            *overrides,
        ],
    )
    result = binarize.finetune(None, recipe, data_dir=data, reporter=Reporter())
    return result.history[1]["seconds"]


def saved_bytes(overrides: list[str], batch: int = 64) -> dict[str, float]:
    """MiB saved for backward by one training step of the converted model (batch of random images), in
    the end-to-end step and, with block reconstruction, in a teacher-forced step."""
    from binarize.engine.feature_distill import StageDistillation

    recipe = load_recipe(RECIPE, [f"model.weights={CHECKPOINT}", *overrides])
    teacher = binarize.create_model("cifar_resnet20", weights=CHECKPOINT).eval()
    example = (torch.zeros(1, 3, 32, 32),)
    student = binarize.convert(teacher, recipe.policy, example, layer=recipe.layer_options()).train()
    x = torch.randn(batch, 3, 32, 32)
    if recipe.train.calibrate_thresholds:
        binarize.calibrate_thresholds(student, [x])
    objectives = StageDistillation(student, teacher, recipe.stages[0], 10)
    out = {}
    for kind in ("end to end", "teacher-forced") if objectives.blocks is not None else ("end to end",):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if kind == "teacher-forced":
                with objectives.blocks.record():
                    with torch.no_grad():
                        teacher(x)
                    student(x)
                loss = objectives.blocks.loss()
            else:
                loss = student(x).logsumexp(dim=1).mean()
        loss.backward()
        out[kind] = total[0] / 2**20
    objectives.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an extracted CIFAR-10 folder")
    parser.add_argument("--limit", type=int, default=2000, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    for name, overrides in VARIANTS.items():
        mib = ", ".join(f"{k} {v:.1f} MiB" for k, v in saved_bytes(overrides).items())
        print(f"saved for backward, one step of 64 images, {name}: {mib}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, overrides in VARIANTS.items():
            times[name].append(epoch_seconds(overrides, args.data, args.limit, args.workers))
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    first = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} median {median:7.1f} s per epoch of {args.limit} images, ratio {median / first:.3f} "
              f"(rounds {', '.join(f'{v:.1f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()
