"""``binarize inspect``: the report of a saved binary model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import binarize
import binarize.files
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, print_json, print_warnings
from binarize.cli._report import _size, render_report

__all__ = ["inspect_command"]


@errors_as_one_line
def inspect_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors file written by binarize.")],
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Print the layers and the size/ops summary of a saved binary model (a training or a packed file)."""
    model = binarize.load(file)
    print_warnings(model)
    report = binarize.inspect(model)
    on_disk = {"path": str(file), "bytes": file.stat().st_size, "format": binarize.files.read_document(file)["format"]}
    if output_format is OutputFormat.json:
        print_json({**report.to_dict(), "file": on_disk})
    else:
        fp32 = report.summary.fp32_bytes
        row = f"{_size(on_disk['bytes'])} ({on_disk['bytes'] / fp32:.3f} of {_size(fp32)} in float32)"
        render_report(report, console, title=file.name, extra_rows=((f"file on disk ({on_disk['format']})", row),))
