"""Eval-mode forward of a simulated model: exact counts then the scale (now) vs alpha premultiplied (before).

``ReCUConv2d`` in eval mode without autograd computes ``alpha * conv(sign(x), sign(W))`` (docs/layer.md,
"Inference"); before 2026-12-01 it convolved with the premultiplied weight ``alpha * sign(W)``, as training
does. This times both on the same model, interleaved in one process, and prints the ratio.

Run: ``python benchmarks/inference_arithmetic.py [--model-file F] [--batch 250] [--rounds 7]`` (a CIFAR
ResNet-20 with random weights unless a binarize model file is given).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import binarize
from binarize.deploy.timing import machine_line
from binarize.nn import ReCUConv2d
from binarize.nn.functional import sign_conv2d


def premultiplied_forward(self: ReCUConv2d, x: torch.Tensor) -> torch.Tensor:
    """The eval forward before the change: the training path's arithmetic."""
    if self.activation_bias is not None:
        x = x + self.activation_bias.to(x.dtype).view(1, -1, 1, 1)
    conv = (self.stride, self.padding, self.dilation, self.groups)
    return sign_conv2d(x, self.binary_weight(), self.bias, *conv, False, self.padding_mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", help="a binarize model file (default: a converted CIFAR ResNet-20)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    if args.model_file:
        model = binarize.load(args.model_file)
    else:
        model = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    model.eval()
    x = torch.randn(args.batch, *binarize.binarize_meta(model).input_size)
    forwards = {"premultiplied (before)": premultiplied_forward, "exact counts (now)": ReCUConv2d.forward}
    times: dict[str, list[float]] = {name: [] for name in forwards}
    original = ReCUConv2d.forward
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, forward in forwards.items():
                    ReCUConv2d.forward = forward
                    model(x)
                    start = time.perf_counter()
                    for _ in range(3):
                        model(x)
                    times[name].append((time.perf_counter() - start) / 3)
    finally:
        ReCUConv2d.forward = original
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:24s} {median * 1e3:8.1f} ms (rounds {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})")
    print(f"  exact / premultiplied: {medians['exact counts (now)'] / medians['premultiplied (before)']:.3f}")


if __name__ == "__main__":
    main()
