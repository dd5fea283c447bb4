"""Benchmark of the packed binary convolution (metric M6 of the performance notes).

For each convolution shape, in one process with interleaved rounds:

* ``fp32``: the best of ``F.conv2d`` in NCHW and in channels_last (float weights, same shape): the baseline;
* ``packed[K]``: ``PackedBinaryConv2d`` forward on each kernel K available here (float channels_last input,
  float output; sign, bit packing, im2col, the XOR-popcount GEMM and the output transform all included),
  the NCHW-input variant for the active kernel too;
* ``int8 +-1``: the same +-1 product as an int8 GEMM through ``torch._int_mm``, with im2col (sign, float
  ``unfold``, cast, GEMM, output transform) and without it (the GEMM alone on a prepared matrix).

Shapes: M6's 3x3 256->256 on 14x14 at batch 1 and 8, and the CIFAR ResNet shapes (16, 32, 64 channels on 32,
16, 8 pixels) at batch 1 and 64. Times are medians over rounds of per-round medians; ratios are taken
round by round against the fp32 baseline of the same round (median and min-max). Read the ratios: the
machine is shared and absolute times are noisy.

Usage::

    python benchmarks/bench_kernels.py                 # 1 thread, all shapes
    python benchmarks/bench_kernels.py --only m6 --rounds 9
    python benchmarks/bench_kernels.py --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from binarize.nn import PackedBinaryConv2d, kernel_info
from binarize.runtime import pack_signs
from binarize.runtime.machine import machine_line

# name -> (batch, channels in, channels out, height = width)
SHAPES = {
    "m6-b1": (1, 256, 256, 14),
    "m6-b8": (8, 256, 256, 14),
    "cifar16-32px-b1": (1, 16, 16, 32),
    "cifar32-16px-b1": (1, 32, 32, 16),
    "cifar64-8px-b1": (1, 64, 64, 8),
    "cifar16-32px-b64": (64, 16, 16, 32),
    "cifar32-16px-b64": (64, 32, 32, 16),
    "cifar64-8px-b64": (64, 64, 64, 8),
}


def _time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(batch: int, cin: int, cout: int, size: int) -> dict[str, Callable[[], object]]:
    """The timed callables of one shape (3x3, stride 1, padding 1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=gen)
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    signs = weight >= 0
    layer = PackedBinaryConv2d.from_tensors(
        pack_signs(signs), torch.rand(cout, generator=gen), torch.randn(cout, generator=gen), in_channels=cin, padding=1
    )
    mul, add = layer.mul.view(1, -1, 1, 1), layer.add.view(1, -1, 1, 1)
    w_int8 = (signs.to(torch.int8) * 2 - 1).reshape(cout, -1).t().contiguous()  # [K, N]
    a_int8 = F.unfold(torch.where(x < 0, -1.0, 1.0), 3, padding=1).transpose(1, 2).reshape(-1, cin * 9)
    a_int8 = a_int8.to(torch.int8).contiguous()

    def int8_with_im2col():
        s = torch.where(x_cl < 0, -1.0, 1.0)
        a = F.unfold(s, 3, padding=1).transpose(1, 2).reshape(-1, cin * 9).to(torch.int8)
        acc = torch._int_mm(a, w_int8).view(batch, size, size, cout).permute(0, 3, 1, 2)
        return acc.float().mul_(mul).add_(add)

    def packed(kernel: str, inp: torch.Tensor):
        def run():
            layer.kernel = kernel
            return layer(inp)

        return run

    out: dict[str, Callable[[], object]] = {
        "fp32 NCHW": lambda: F.conv2d(x, weight, None, 1, 1),
        "fp32 channels_last": lambda: F.conv2d(x_cl, weight_cl, None, 1, 1),
    }
    info = kernel_info()
    for kernel in info["available"]:
        out[f"packed[{kernel}]"] = packed(kernel, x_cl)
    out[f"packed[{info['active']}] NCHW input"] = packed(info["active"], x)
    out["int8 +-1 _int_mm, im2col included"] = int8_with_im2col
    out["int8 +-1 _int_mm, GEMM only"] = lambda: torch._int_mm(a_int8, w_int8)
    return out


def run_shape(name: str, shape: tuple[int, int, int, int], rounds: int, budget: float) -> dict:
    fns = variants(*shape)
    for fn in fns.values():  # warm-up (weights repacked, caches filled)
        fn()
    single = {key: _time(fn, 3) for key, fn in fns.items()}
    # calls per round: about ``budget`` seconds' worth, at least 3 (1 for a variant slower than the budget)
    reps = {key: max(1 if t > budget else 3, min(200, int(budget / max(t, 1e-6)))) for key, t in single.items()}
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key].append(_time(fn, reps[key]))
    baseline = [min(a, b) for a, b in zip(times["fp32 NCHW"], times["fp32 channels_last"], strict=True)]
    rows = {}
    for key, values in times.items():
        ratios = [v / b for v, b in zip(values, baseline, strict=True)]
        rows[key] = {
            "ms": statistics.median(values) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return {"shape": dict(zip(("batch", "cin", "cout", "size"), shape, strict=True)), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and kernel threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per variant per round (default 0.05)")
    parser.add_argument("--only", nargs="*", default=None, help="shape name prefixes, e.g. m6 cifar16")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    line = machine_line()
    print(line)
    results = {"machine": line, "kernel_info": kernel_info(), "shapes": {}}
    for name, shape in SHAPES.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        result = run_shape(name, shape, args.rounds, args.budget)
        results["shapes"][name] = result
        print(f"\n{name}: batch {shape[0]}, 3x3 {shape[1]}->{shape[2]}, {shape[3]}x{shape[3]}")
        for key, row in result["rows"].items():
            print(
                f"  {key:38s} {row['ms']:9.3f} ms   x{row['ratio']:.3f} of fp32 "
                f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
