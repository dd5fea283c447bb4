"""``binarize demo``: the main job on scikit-learn's bundled digits, offline, in about a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import binarize
import binarize.engine
from binarize.cli._common import check_run_dir, console, errors_as_one_line
from binarize.cli._report import _size
from binarize.demo import run_demo

__all__ = ["demo_command"]


def _check_options(epochs: int, output: Path | None) -> None:
    """The demo's options, checked before the float CNN is trained (in the command line's words)."""
    if epochs < 1:
        raise binarize.BinarizeError(f"--epochs must be >= 1 (the binary model's fine-tuning epochs), got {epochs}")
    if output is None:
        return
    check_run_dir(output)
    if output.is_dir() and any(output.iterdir()):
        raise binarize.BinarizeError(
            f"--output {output} is not empty; the demo starts a new run every time (it cannot continue one): "
            "give a new or empty directory"
        )


@errors_as_one_line
def demo_command(
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs of the binary model.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Keep the run (checkpoints, metrics) in this new directory.")
    ] = None,
) -> None:
    """Train a small CNN on handwritten digits, binarize it, fine-tune it, and compare."""
    _check_options(epochs, output)
    console.print("Training a float CNN on scikit-learn's handwritten digits (1,797 images, 8x8)...")
    result = run_demo(seed=seed, binary_epochs=epochs, output_dir=output, reporter=binarize.engine.default_reporter())
    table = Table(title="binarize demo: digits, 1-bit weights and activations (ReCU)")
    for column, justify in (("model", "left"), ("val top-1", "right"), ("file on disk", "right"), ("latency", "right")):
        table.add_column(column, justify=justify)
    table.add_row(
        "float CNN", f"{result.float_top1:.1f}%", _size(result.fp32_bytes) + " (fp32)", f"{result.float_ms:.3f} ms"
    )
    table.add_row(f"binary, converted ({result.binary_convs} convs)", f"{result.converted_top1:.1f}%", "", "")
    table.add_row(f"binary, fine-tuned {epochs} epochs", f"{result.finetuned_top1:.1f}%", "", "")
    table.add_row(
        f"binary, packed file ({result.kernel})",
        f"{result.packed_top1:.1f}%",
        _size(result.packed_bytes) + " (1-bit)",
        f"{result.packed_ms:.3f} ms",
    )
    console.print(table)
    where = f" (files in {output})" if output is not None else ""
    console.print(
        f"size on disk: {_size(result.fp32_bytes)} float -> {_size(result.packed_bytes)} packed "
        f"({result.fp32_bytes / result.packed_bytes:.1f}x smaller); latency {result.packed_ms / result.float_ms:.2f}x "
        f"of the float CNN's; took {result.seconds:.0f} s{where}"
    )
