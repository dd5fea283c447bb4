"""``binarize bench``: what binarization buys on this CPU, measured.

For one model file (a training file or a packed file) it times, in one process and in interleaved
rounds, batch-``B`` forwards of: the float model the file came from (rebuilt from its source; the
float weights do not change the time), the simulated binary model (binarize's training form), the packed
model on every kernel this machine offers (``kernel_info()["available"]``, forced per layer), and, when
onnxruntime is installed, the ONNX export of the packed model and of the float model. Each round runs every
variant for about the same time, in a rotating order; the result is the median over the rounds of each
round's mean call time, the spread (fastest and slowest round), and the ratio of medians against float.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize._utils import default_example_inputs
from binarize.conversion.pipeline import convert
from binarize.deploy import layer as _layer
from binarize.deploy.folding import pack
from binarize.deploy.packed_file import FORMAT, file_format, load_packed, read_packed_header
from binarize.errors import BinarizeError
from binarize.models import create_model
from binarize.runtime.machine import machine_line

__all__ = ["BenchResult", "BenchRow", "bench", "machine_line", "time_interleaved"]


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One timed variant.

    Attributes:
        name: ``float``, ``simulated``, ``packed[<kernel>]``, ``onnxruntime float`` or ``onnxruntime binary``.
        median_ms: Median over the rounds of the mean time of one forward, in milliseconds.
        min_ms: The fastest round's mean.
        max_ms: The slowest round's mean.
        ratio: ``median_ms`` over the float model's (None without a float model).
    """

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    ratio: float | None


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured.

    Attributes:
        file: The model file.
        machine: :func:`machine_line`.
        threads: Intra-op threads used (torch and onnxruntime alike).
        batch: Images per forward.
        input_size: ``(C, H, W)``.
        rounds: Interleaved rounds.
        rows: One row per variant, float first.
        notes: What was left out and why.
    """

    file: str
    machine: str
    threads: int
    batch: int
    input_size: tuple[int, ...]
    rounds: int
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self, name: str) -> BenchRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)


def time_interleaved(
    variants: dict[str, Callable[[], Any]], rounds: int = 7, round_s: float = 0.3, warmup: int = 2
) -> dict[str, list[float]]:
    """Mean seconds per call of each variant in each round; rounds interleave the variants (rotating order).

    Args:
        variants: Name -> a function running one forward.
        rounds: Rounds.
        round_s: About how long each variant runs per round (the calls per round are set from a first call).
        warmup: Untimed calls of each variant first.
    """
    calls = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(round_s / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = variants[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return times


def _torch_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(x)

    return run


def _packed_call(model: nn.Module, x: torch.Tensor, kernel: str) -> Callable[[], Any]:
    def run() -> Any:
        _layer.set_kernel(model, kernel)
        with torch.no_grad():
            return model(x)

    return run


def _onnx_session(model: nn.Module, directory: str, name: str, threads: int, example: torch.Tensor, binary: bool):
    import onnxruntime

    from binarize.deploy.onnx_export import export_onnx

    path = Path(directory) / f"{name}.onnx"
    if binary:
        export_onnx(model, path, example_inputs=example)
    else:
        from binarize.deploy.onnx_export import float_onnx

        float_onnx(model, path, example)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _models(path: Path, model: nn.Module | None) -> tuple[nn.Module | None, nn.Module | None, nn.Module, tuple, list]:
    """(float, simulated, packed, input size, notes) for a model file."""
    notes = []
    if file_format(path) == FORMAT:
        header = read_packed_header(path)
        source, conversion = header.source, header.conversion
        float_model = model
        if float_model is None and source:
            float_model = create_model(source["spec"], num_classes=source.get("num_classes"))
        if float_model is None:
            raise BinarizeError(f"{path} records no source model; pass the float model (bench(path, model=...))")
        packed = load_packed(path, model=float_model)
        inputs = default_example_inputs(float_model, conversion.input_size)
        simulated = convert(float_model, conversion.policy, inputs, layer=conversion.layer)
        notes.append("simulated model rebuilt from the source with fresh weights (the time does not depend on them)")
        return float_model, simulated, packed, conversion.input_size, notes
    from binarize.files import load, read_header

    header = read_header(path)
    simulated = load(path, model=model)
    float_model = model
    if float_model is None and header.source:
        float_model = create_model(header.source["spec"], num_classes=header.source.get("num_classes"))
    return float_model, simulated, pack(simulated), header.input_size, notes


def bench(
    file: str | Path,
    *,
    threads: int | None = None,
    batch: int = 1,
    input_size: tuple[int, ...] | None = None,
    rounds: int = 7,
    round_s: float = 0.3,
    onnx: bool = True,
    model: nn.Module | None = None,
) -> BenchResult:
    """Times the float, simulated and packed forms of a model file (and onnxruntime), interleaved.

    Args:
        file: A binarize training file or a packed file.
        threads: Intra-op threads (torch and onnxruntime); the current ``torch.get_num_threads()`` when None.
        batch: Images per forward.
        input_size: ``(C, H, W)``; the conversion's input size when None.
        rounds: Interleaved rounds (the median is over them).
        round_s: About how long each variant runs per round.
        onnx: Also time onnxruntime on the ONNX exports, when onnxruntime and onnx are installed.
        model: The float model, for files from models built by user code (no source recorded).

    Returns:
        The rows (float first) with median, spread and ratio against float, and the machine line.
    """
    if batch < 1 or rounds < 1:
        raise BinarizeError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}")
    previous = torch.get_num_threads()
    threads = threads if threads is not None else previous
    if threads < 1:
        raise BinarizeError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        path = Path(file)
        float_model, simulated, packed, recorded_size, notes = _models(path, model)
        size = tuple(input_size) if input_size is not None else tuple(recorded_size)
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
        variants: dict[str, Callable[[], Any]] = {}
        if float_model is not None:
            variants["float"] = _torch_call(float_model.eval(), x)
        variants["simulated"] = _torch_call(simulated.eval(), x)
        for kernel in _layer.available_kernels():
            variants[f"packed[{kernel}]"] = _packed_call(packed, x, kernel)
        with tempfile.TemporaryDirectory() as tmp:
            if onnx:
                try:
                    import onnx as _onnx  # noqa: F401
                    import onnxruntime  # noqa: F401
                except ImportError:
                    notes.append("onnxruntime not installed: no ONNX rows (pip install 'binarize[onnx]')")
                else:
                    feed = {"input": x.numpy()}
                    if float_model is not None:
                        session = _onnx_session(float_model, tmp, "float", threads, x, binary=False)
                        variants["onnxruntime float"] = lambda s=session: s.run(None, feed)
                    session = _onnx_session(packed, tmp, "binary", threads, x, binary=True)
                    variants["onnxruntime binary"] = lambda s=session: s.run(None, feed)
            times = time_interleaved(variants, rounds=rounds, round_s=round_s)
        _layer.set_kernel(packed, None)
    finally:
        torch.set_num_threads(previous)
    base = statistics.median(times["float"]) if "float" in times else None
    rows = tuple(
        BenchRow(
            name=name,
            median_ms=1e3 * statistics.median(t),
            min_ms=1e3 * min(t),
            max_ms=1e3 * max(t),
            ratio=statistics.median(t) / base if base else None,
        )
        for name, t in times.items()
    )
    return BenchResult(
        file=str(path),
        machine=machine_line(threads),
        threads=threads,
        batch=batch,
        input_size=size,
        rounds=rounds,
        rows=rows,
        notes=tuple(notes),
    )
