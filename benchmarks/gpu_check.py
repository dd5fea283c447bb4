"""GPU check: binary vs float ResNet-18 training speed, memory and host syncs on one GPU.

Synthetic data on the device (no loader), torchvision ResNet-18 at 224x224, bf16 autocast,
channels_last, batch 256, SGD with momentum. Prints, for eager and ``torch.compile``:
images/s of binary over float (same process, interleaved), the peak-memory ratio, and whether a
binary training step runs under ``torch.cuda.set_sync_debug_mode("error")`` (no host syncs).
Needs nothing but what binarize needs; runs within about 8 minutes on one H100.

Run: ``python benchmarks/gpu_check.py`` (``--device cpu --batch 8 --size 64 --steps 3`` checks it
on a CPU; compile needs a C++ compiler there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision

import binarize


def step_fn(model, optimizer, images, labels, dtype):
    def step():
        with torch.autocast(images.device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict, device, n: int, rounds: int) -> dict:
    """Median seconds per step of each variant, interleaved rounds."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / n)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def peak_memory(step, device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def sync_free(step, device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        synchronize(device)
        return "yes"
    except RuntimeError as err:
        return f"NO: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; binarize {binarize.__version__}; batch {args.batch}, "
          f"{args.size}px, bf16 autocast, channels_last", flush=True)  # fmt: skip
    images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    float_model = torchvision.models.resnet18().to(device).to(memory_format=torch.channels_last).train()
    binary_model = binarize.convert(float_model, example_inputs=(images[:1],)).to(device).train()
    binary_model.to(memory_format=torch.channels_last)
    results: dict = {"device": name, "batch": args.batch, "size": args.size}
    models = {"float": float_model, "binary": binary_model}
    variants = [("eager", lambda m: m)]
    if not args.no_compile:
        variants.append(("compiled", torch.compile))
    for label, wrap in variants:
        steps = {}
        for key, model in models.items():
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            steps[key] = step_fn(wrap(model), optimizer, images, labels, torch.bfloat16)
            start = time.perf_counter()
            for _ in range(3):
                steps[key]()
            synchronize(device)
            results[f"{label}_{key}_warmup_s"] = time.perf_counter() - start
        seconds = measure(steps, device, args.steps, args.rounds)
        memory = {key: peak_memory(step, device) for key, step in steps.items()}
        results[label] = {
            "float_images_per_s": args.batch / seconds["float"],
            "binary_images_per_s": args.batch / seconds["binary"],
            "binary_over_float_images_per_s": seconds["float"] / seconds["binary"],
            "step_time_ratio": seconds["binary"] / seconds["float"],
            "peak_memory_ratio": None if memory["float"] is None else memory["binary"] / memory["float"],
            "binary_step_sync_free": sync_free(steps["binary"], device),
        }
        r = results[label]
        print(
            f"{label:8s} float {r['float_images_per_s']:8.0f} img/s  binary {r['binary_images_per_s']:8.0f} img/s  "
            f"binary/float {r['binary_over_float_images_per_s']:.3f} (step time x{r['step_time_ratio']:.2f})  "
            f"peak memory ratio {r['peak_memory_ratio']}  sync-free: {r['binary_step_sync_free']}  "
            f"warm-up {results[f'{label}_float_warmup_s']:.0f}/{results[f'{label}_binary_warmup_s']:.0f} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
