"""``binarize bench``: latency of the float, simulated and packed forms of a model on this CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, parse_input_size, print_json

__all__ = ["bench_command"]


@errors_as_one_line
def bench_command(
    file: Annotated[Path, typer.Argument(help="A binarize model file (training or packed).")],
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: torch's).")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward.")] = 1,
    input_size: Annotated[str | None, typer.Option(help="Input size C,H,W (default: the model's).")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds.")] = 7,
    onnx: Annotated[bool, typer.Option(help="Also time onnxruntime on the ONNX exports (when installed).")] = True,
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Time the float model, the simulated binary model, the packed model (every kernel) and onnxruntime.

    Rounds interleave the variants; the table shows the median time per forward, the fastest and slowest
    round, and the ratio against the float model.
    """
    import binarize.deploy

    result = binarize.deploy.bench(
        file, threads=threads, batch=batch, input_size=parse_input_size(input_size), rounds=rounds, onnx=onnx
    )
    if output_format is OutputFormat.json:
        print_json(result.to_dict())
        return
    size = "x".join(str(v) for v in result.input_size)
    table = Table(title=f"{file.name}: batch {result.batch}, {size}, {result.rounds} rounds")
    for column in ("model", "median ms", "fastest", "slowest", "vs float"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        table.add_row(escape(row.name), f"{row.median_ms:.2f}", f"{row.min_ms:.2f}", f"{row.max_ms:.2f}", ratio)
    console.print(table)
    console.print(result.machine, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
