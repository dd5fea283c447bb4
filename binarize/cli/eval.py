"""``binarize eval``: accuracy and loss of a saved model on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import binarize
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, print_json

__all__ = ["eval_command"]


@errors_as_one_line
def eval_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors model written by binarize.")],
    data: Annotated[Path, typer.Option(help="Dataset directory; its val/ (or test/) split is used.")],
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    workers: Annotated[int, typer.Option(help="Loader worker processes.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Evaluate a saved model: top-1, top-5 and loss on the validation split.

    The images are prepared exactly as in the run that wrote the file (its recorded data settings),
    else from the model's defaults.
    """
    metrics = binarize.evaluate_file(file, data, batch_size=batch_size, workers=workers, device=device)
    if output_format is OutputFormat.json:
        print_json(metrics)
        return
    table = Table(title=f"{file.name} on {data}")
    for column in ("top-1", "top-5", "loss", "images"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{metrics['top1']:.2f}%", f"{metrics['top5']:.2f}%", f"{metrics['loss']:.4f}", str(metrics["images"])
    )
    console.print(table)
