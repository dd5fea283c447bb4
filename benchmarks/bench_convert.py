"""Benchmarks of the conversion and of the ReCU layer (metrics M1, M2, M3, M4, M8 of the performance notes).

* M1: training-step time of the converted torchvision ResNet-18 over the float one (32x32 input, batch 64),
  eager and under ``torch.compile``, measured in interleaved rounds in one process;
* M2: bytes of the tensors saved for backward during one forward, converted over float;
* M3: host synchronisations (``.item()``-like ops) in one training step, which must be 0;
* M4: the fused ``ReCUConv2d`` against the same formulas written as plain autograd ops (time of forward
  plus backward, and the largest gradient difference in float64);
* M8: conversion time of timm models over one batch-1 224 px forward, with the share of parameters and
  MACs converted.

Absolute times on a shared machine are noisy; read the ratios and their min-max spread across rounds.

Usage::

    python benchmarks/bench_convert.py              # everything (several minutes; compile takes 1-2 min)
    python benchmarks/bench_convert.py --quick --skip-compile
    python benchmarks/bench_convert.py --only m1 m3 --cifar-stem
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import binarize
from binarize.nn import ReCUConv2d
from binarize.nn.functional import EPS, WEIGHT_SCALE
from binarize.runtime.machine import machine_line as runtime_machine_line

DEFAULT_MODELS = (
    "resnet18",
    "resnet50",
    "mobilenetv2_100",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_tiny_patch16_224",
    "mobilenetv3_large_100",
    "regnetx_002",
    "densenet121",
)
METRICS = ("m1", "m2", "m3", "m4", "m8")
BATCH = 64
SIZE = 32
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------------
# machine and timing helpers


def machine_line() -> str:
    """The runtime's machine line, with torchvision, binarize, the date and the machine's load."""
    return (
        f"machine: {runtime_machine_line()}; torchvision {torchvision.__version__}, binarize {binarize.__version__}; "
        f"{datetime.date.today().isoformat()}; {load_line()}"
    )


def load_line() -> str:
    """The 1-minute load average and the CPU count: other processes on a shared machine inflate timings."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def _time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _machine_busy_seconds() -> float:
    """CPU seconds used by everything on the machine since boot (``/proc/stat``), steal time included."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return math.nan
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class Timings:
    """Per-round medians (seconds) of each variant, and how busy the rest of the machine was in each round.

    ``other_load[r]`` is the CPU time used by other processes (and the hypervisor) during round ``r``, as a
    fraction of the machine: 0 on a quiet machine, 0.5 when another process kept one of two CPUs busy.
    """

    medians: dict[str, list[float]]
    other_load: list[float]


def wait_until_quiet(max_wait: float, window: float = 2.0) -> None:
    """Waits (at most ``max_wait`` seconds) until other processes use under MAX_OTHER_LOAD of the machine."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        busy, own = _machine_busy_seconds(), _own_seconds()
        time.sleep(window)
        others = (_machine_busy_seconds() - busy) - (_own_seconds() - own)
        if not others / (window * (os.cpu_count() or 1)) > MAX_OTHER_LOAD:
            return


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, calls: int, warmup: int, wait_quiet: float = 0.0
) -> Timings:
    """Times every function in alternating rounds: per round, the median of ``calls`` calls of each.

    The order of the functions is reversed every other round so that no variant always runs right after
    the same neighbour (caches, frequency). With ``--wait-quiet`` each round first waits for a quiet machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    medians: dict[str, list[float]] = {name: [] for name in fns}
    other_load = []
    names = list(fns)
    for r in range(rounds):
        if wait_quiet > 0:
            wait_until_quiet(wait_quiet)
        busy, own, wall = _machine_busy_seconds(), _own_seconds(), time.perf_counter()
        for name in names if r % 2 == 0 else reversed(names):
            medians[name].append(statistics.median(_time_call(fns[name]) for _ in range(calls)))
        others = (_machine_busy_seconds() - busy) - (_own_seconds() - own)
        other_load.append(max(0.0, others) / ((time.perf_counter() - wall) * (os.cpu_count() or 1)))
    return Timings(medians, other_load)


MAX_OTHER_LOAD = 0.1
"""Rounds in which other processes used more than this share of the machine are left out of the ratios."""


@dataclasses.dataclass
class Ratio:
    """A time ratio over the quiet rounds (all rounds when fewer than 3 were quiet)."""

    value: float
    low: float
    high: float
    rounds_used: int
    rounds: int
    quiet: bool

    def __str__(self) -> str:
        kept = (
            f"{self.rounds_used}/{self.rounds} quiet rounds"
            if self.quiet
            else f"all {self.rounds} rounds, fewer than 3 quiet: CONTENDED"
        )
        return f"{self.value:.2f} (rounds {self.low:.2f}-{self.high:.2f}; {kept})"


def ratio_summary(t: Timings, num: str, den: str, max_other_load: float = MAX_OTHER_LOAD) -> Ratio:
    """Median of the per-round medians of ``num`` over that of ``den``, and the min-max of the per-round ratios."""
    rounds = [r for r, load in enumerate(t.other_load) if not load > max_other_load]
    quiet = len(rounds) >= 3
    if not quiet:
        rounds = list(range(len(t.other_load)))
    a, b = [t.medians[num][r] for r in rounds], [t.medians[den][r] for r in rounds]
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    value = statistics.median(a) / statistics.median(b)
    return Ratio(value, min(per_round), max(per_round), len(rounds), len(t.other_load), quiet)


def median_ms(t: Timings, name: str) -> float:
    return 1e3 * statistics.median(t.medians[name])


# ----------------------------------------------------------------------------------------------------------------
# models and training steps


def resnet18(cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet-18 with 10 classes; the CIFAR stem is a 3x3 stride-1 conv and no max-pool."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def convert(model: nn.Module) -> nn.Module:
    """Conversion with the default Policy, traced at the benchmark's input size."""
    return binarize.convert(model, example_inputs=(torch.zeros(1, 3, SIZE, SIZE),))


def batch(n: int = BATCH, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen, dtype=dtype)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def train_step(model: nn.Module, x: Tensor, y: Tensor, call_item: bool = False) -> Callable[[], None]:
    """A closure running forward, cross-entropy, backward and an SGD (momentum 0.9) step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if call_item:
            loss.item()

    return step


# ----------------------------------------------------------------------------------------------------------------
# M1: training step, binary over float


def m1_train_step(args: argparse.Namespace, cifar_stem: bool = False) -> dict[str, object]:
    label = "CIFAR stem" if cifar_stem else "ImageNet stem"
    fp = resnet18(cifar_stem)
    models = {"fp eager": fp, "binary eager": convert(fp)}
    if not args.skip_compile:
        models["fp compiled"] = torch.compile(copy.deepcopy(models["fp eager"]))
        models["binary compiled"] = torch.compile(copy.deepcopy(models["binary eager"]))
    x, y = batch()
    steps = {name: train_step(m, x, y) for name, m in models.items()}
    first, first_load = {}, {}
    for name, step in steps.items():
        if args.wait_quiet > 0:
            wait_until_quiet(args.wait_quiet)
        busy, own = _machine_busy_seconds(), _own_seconds()
        first[name] = _time_call(step)
        others = (_machine_busy_seconds() - busy) - (_own_seconds() - own)
        first_load[name] = max(0.0, others) / (first[name] * (os.cpu_count() or 1))
    rounds, calls = (3, 2) if args.quick else (args.rounds, 3 if cifar_stem else 5)
    t = interleaved(steps, rounds=rounds, calls=calls, warmup=1 if args.quick else 2, wait_quiet=args.wait_quiet)
    print(f"\n[M1] training step, torchvision resnet18 ({label}), batch {BATCH}, {SIZE}x{SIZE}, ", end="")
    print(f"{rounds} interleaved rounds x {calls} steps; other load per round {_loads(t)}")
    for name in steps:
        extra = (
            f", first step (compile) {first[name]:.1f} s, other load {first_load[name]:.0%}"
            if "compiled" in name
            else ""
        )
        print(f"  {name:16s} {median_ms(t, name):8.1f} ms/step{extra}")
    result: dict[str, object] = {"ms": {name: median_ms(t, name) for name in steps}, "first_s": first}
    result["eager"] = ratio_summary(t, "binary eager", "fp eager")
    print(f"  M1  eager    binary / fp eager    = {result['eager']}")
    if not args.skip_compile:
        result["compiled"] = ratio_summary(t, "binary compiled", "fp compiled")
        result["compiled_vs_fp_eager"] = ratio_summary(t, "binary compiled", "fp eager")
        print(f"  M1c compiled binary / fp compiled = {result['compiled']}")
        print(f"      compiled binary / fp eager    = {result['compiled_vs_fp_eager']}")
    return result


def _loads(t: Timings) -> str:
    return " ".join(f"{load:.0%}" for load in t.other_load)


# ----------------------------------------------------------------------------------------------------------------
# M2: bytes saved for backward


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one training-mode forward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def m2_saved_bytes(args: argparse.Namespace) -> dict[str, float]:
    print(f"\n[M2] tensors saved for backward, one forward, batch {BATCH}, {SIZE}x{SIZE}")
    result = {}
    for cifar_stem in (False, True) if args.cifar_stem else (False,):
        fp = resnet18(cifar_stem)
        x, _ = batch()
        fp_bytes, bin_bytes = saved_bytes(fp, x), saved_bytes(convert(fp), x)
        label = "cifar" if cifar_stem else "imagenet"
        result[label] = bin_bytes / fp_bytes
        print(
            f"  resnet18 ({label} stem): fp {fp_bytes / 2**20:.1f} MiB, binary {bin_bytes / 2**20:.1f} MiB, "
            f"M2 = {result[label]:.2f}"
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# M3: host synchronisations


class SyncCounter(TorchDispatchMode):
    """Counts the ATen ops that read a tensor value back to the host (a device sync on a GPU)."""

    SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "item")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNC_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def m3_host_syncs(args: argparse.Namespace) -> dict[str, object]:
    model = convert(resnet18())
    x, y = batch(8)
    step = train_step(model, x, y)
    step()  # create the optimizer state outside the counted step
    with SyncCounter() as counter:
        step()
    check = train_step(model, x, y, call_item=True)
    with SyncCounter() as control:
        check()
    explain = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    print("\n[M3] host syncs in one training step of the converted resnet18 (forward, backward, SGD step)")
    print(f"  M3 = {len(counter.ops)} {sorted(set(counter.ops)) or ''}")
    print(f"  check of the counter: a step that calls loss.item() counts {len(control.ops)}")
    print(f"  torch._dynamo.explain: {explain.graph_count} graph(s), {explain.graph_break_count} graph break(s)")
    return {"syncs": len(counter.ops), "control": len(control.ops), "graph_breaks": explain.graph_break_count}


# ----------------------------------------------------------------------------------------------------------------
# M4: the fused layer against autograd by composition


def _sign_pm1(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def composed_recu_conv2d(x: Tensor, layer: ReCUConv2d, training: bool) -> Tensor:
    """The ReCU convolution written with ordinary autograd ops (the official formulation without ``.item()``)."""
    w = layer.weight
    dims = tuple(range(1, w.dim()))
    centred = w - w.mean(dim=dims, keepdim=True)
    w1 = centred * WEIGHT_SCALE / torch.sqrt(centred.var(dim=dims, keepdim=True, correction=1) + EPS)
    q = (-w1.detach().abs().mean() * torch.log(2.0 - 2.0 * layer.tau.to(w.dtype))).detach()
    clamped = torch.clamp(w1, -q, q)
    wb = clamped + (_sign_pm1(w1) - clamped).detach()
    a0 = x / torch.sqrt(x.var(dim=(1, 2, 3), keepdim=True, correction=1) + EPS) if training else x
    c = torch.clamp(a0, -1.0, 1.0)
    soft = 2.0 * c - c * c.abs()  # d soft / d a0 = max(0, 2 - 2|a0|)
    xb = soft + (_sign_pm1(a0) - soft).detach()
    out = F.conv2d(xb, wb, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = out * layer.alpha.view(1, -1, 1, 1)
    return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


class ComposedReCUConv2d(nn.Module):
    """Runs a ``ReCUConv2d``'s parameters through :func:`composed_recu_conv2d`."""

    def __init__(self, layer: ReCUConv2d) -> None:
        super().__init__()
        if layer.padding_mode != "zeros" or not layer.binarize_weights:
            raise ValueError("the composition covers zero padding and binary weights only")
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return composed_recu_conv2d(x, self.layer, self.training)


def composed_model(model: nn.Module) -> nn.Module:
    """A copy of a converted model whose ReCUConv2d layers run by composition."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ReCUConv2d):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, ComposedReCUConv2d(module))
    return model


def _layer_fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        xi = x.detach().requires_grad_()
        fn(xi).backward(grad)

    return run


def _max_grad_diff(a: nn.Module, b: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[float, float]:
    """Max abs difference over the input and parameter gradients of two modules, and the max abs gradient."""
    grads = []
    for m in (a, b):
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out = m(xi)
        if y is None:
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        else:
            F.cross_entropy(out, y).backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    diff = max((g1 - g2).abs().max().item() for g1, g2 in zip(*grads, strict=True))
    return diff, max(g.abs().max().item() for g in grads[0])


def m4_fused_vs_composition(args: argparse.Namespace) -> dict[str, object]:
    rounds = 3 if args.quick else args.rounds
    result: dict[str, object] = {}
    print("\n[M4] fused ReCUConv2d vs autograd by composition (time of forward + backward, composed / fused)")
    torch.manual_seed(0)
    layer = ReCUConv2d.from_float(nn.Conv2d(256, 256, 3, padding=1, bias=False)).train()
    composed = ComposedReCUConv2d(layer).train()
    x = torch.randn(64, 256, 14, 14)
    grad = torch.randn(64, 256, 14, 14)
    t = interleaved(
        {"fused": _layer_fwd_bwd(layer, x, grad), "composed": _layer_fwd_bwd(composed, x, grad)},
        rounds=rounds,
        calls=3 if args.quick else 5,
        warmup=1,
        wait_quiet=args.wait_quiet,
    )
    result["layer"] = ratio_summary(t, "composed", "fused")
    print(
        f"  3x3 256->256, 14x14, batch 64: fused {median_ms(t, 'fused'):.1f} ms, composed "
        f"{median_ms(t, 'composed'):.1f} ms, ratio {result['layer']}"
    )

    model = convert(resnet18())
    comp = composed_model(model)
    xb, yb = batch()

    def fwd_bwd(m: nn.Module) -> Callable[[], None]:
        m.train()

        def run() -> None:
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()

        return run

    fns = {"fused": fwd_bwd(model), "composed": fwd_bwd(comp)}
    t = interleaved(fns, rounds=rounds, calls=3, warmup=1, wait_quiet=args.wait_quiet)
    result["resnet18"] = ratio_summary(t, "composed", "fused")
    print(
        f"  resnet18 forward+backward, batch {BATCH}, {SIZE}x{SIZE}: fused {median_ms(t, 'fused'):.1f} ms, "
        f"composed {median_ms(t, 'composed'):.1f} ms, ratio {result['resnet18']}"
    )

    # gradient parity in float64
    layer64 = copy.deepcopy(layer).double()
    x64 = torch.randn(8, 256, 14, 14, dtype=torch.float64) * 1.3 + 0.4
    diff, scale = _max_grad_diff(layer64, ComposedReCUConv2d(layer64), x64)
    result["grad_diff_layer"] = diff
    print(f"  float64 max |grad fused - grad composed|, layer (batch 8): {diff:.1e} (max |grad| {scale:.1e})")
    model64 = copy.deepcopy(model).double()
    x64, y64 = batch(8, torch.float64)
    diff, scale = _max_grad_diff(model64, composed_model(model64), x64, y64)
    result["grad_diff_resnet18"] = diff
    print(f"  float64 max |grad fused - grad composed|, resnet18 (batch 8): {diff:.1e} (max |grad| {scale:.1e})")
    return result


# ----------------------------------------------------------------------------------------------------------------
# M8: conversion time over one forward


def m8_conversion(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import timm

    repeats = 1 if args.quick else 3
    print(
        f"\n[M8] conversion time / one batch-1 224 px fp32 forward (eval, no grad); {repeats} round(s) of "
        "(median of 3 forwards, one conversion), median of the per-round ratios"
    )
    header = ("model", "convert ms", "forward ms", "M8", "params", "MACs")
    print("  {:24s} {:>10s} {:>10s} {:>6s} {:>7s} {:>6s}  binary convs".format(*header))
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            model(x)  # warm-up
        fwds, convs, binary = [], [], None
        for _ in range(repeats):
            if args.wait_quiet > 0:
                wait_until_quiet(args.wait_quiet)
            with torch.no_grad():
                fwds.append(statistics.median(_time_call(lambda m=model, x=x: m(x)) for _ in range(3)))
            start = time.perf_counter()
            binary = binarize.convert(model)
            convs.append(time.perf_counter() - start)
        conv_s, fwd = statistics.median(convs), statistics.median(fwds)
        summary = binarize.inspect(binary).to_dict()["summary"]
        total = sum(p.numel() for p in model.parameters())
        binary_params = sum(m.weight.numel() for m in binary.modules() if isinstance(m, ReCUConv2d))
        row = {
            "convert_ms": 1e3 * conv_s,
            "forward_ms": 1e3 * fwd,
            "ratio": statistics.median(c / f for c, f in zip(convs, fwds, strict=True)),
            "param_fraction": binary_params / total,
            "mac_fraction": summary["binary_mac_fraction"],
            "binary_convs": summary["binary_convs"],
            "traced": summary["traced"],
        }
        results[name] = row
        traced = "" if row["traced"] else " (not traced)"
        print(
            f"  {name:24s} {row['convert_ms']:10.0f} {row['forward_ms']:10.1f} {row['ratio']:6.2f} "
            f"{row['param_fraction']:7.1%} {row['mac_fraction']:6.1%}  {row['binary_convs']}{traced}"
        )
    return results


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds and repeats: checks that the script runs")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants of M1")
    parser.add_argument(
        "--compile-cache", action="store_true", help="keep Inductor's caches on (the compile time is then a warm one)"
    )
    parser.add_argument("--cifar-stem", action="store_true", help="also run M1 and M2 with the CIFAR stem (slow)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm models for M8")
    parser.add_argument("--only", nargs="+", choices=METRICS, default=list(METRICS), help="metrics to run")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds for M1 and M4 (default 10)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each timed round wait up to S seconds for other processes to go quiet (shared machines)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.compile_cache:  # report a cold compile, not a cache hit from an earlier run
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    print(machine_line())
    if "m1" in args.only:
        m1_train_step(args)
        if args.cifar_stem:
            m1_train_step(args, cifar_stem=True)
    if "m2" in args.only:
        m2_saved_bytes(args)
    if "m3" in args.only:
        m3_host_syncs(args)
    if "m4" in args.only:
        m4_fused_vs_composition(args)
    if "m8" in args.only:
        m8_conversion(args)
    print(f"\n{load_line()} at the end")


if __name__ == "__main__":
    main()
