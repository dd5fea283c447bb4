"""``binarize inspect``: the report of a saved binary model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import binarize
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, print_json, print_warnings
from binarize.cli._report import render_report

__all__ = ["inspect_command"]


@errors_as_one_line
def inspect_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors file written by binarize.")],
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Print the layers and the size/ops summary of a saved binary model."""
    model = binarize.load(file)
    print_warnings(model)
    report = binarize.inspect(model)
    if output_format is OutputFormat.json:
        print_json(report.to_dict())
    else:
        render_report(report, console, title=file.name)
