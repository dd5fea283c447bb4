"""``binarize export``: a binary model file in, a deployable file out (packed, ONNX or QONNX)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import binarize
from binarize.cli._common import errors_as_one_line
from binarize.cli._common import stderr as err_console

__all__ = ["EXAMPLES", "export_command"]

EXAMPLES = """Examples:

binarize export runs/r20/best.safetensors -o r20.packed.safetensors

binarize export resnet18-binary.safetensors -o resnet18.packed.safetensors --float-dtype fp16

binarize export runs/r20/best.safetensors -o r20.onnx --format onnx
"""


class ExportFormat(str, Enum):
    packed = "packed"
    onnx = "onnx"
    qonnx = "qonnx"


class FloatDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


@errors_as_one_line
def export_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors model written by binarize (convert or finetune).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.safetensors, or .onnx).")],
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="packed (1-bit safetensors), onnx (onnxruntime) or qonnx (FINN).")
    ] = ExportFormat.packed,
    float_dtype: Annotated[
        FloatDtype, typer.Option(help="How a packed file stores the float layers (fp32 or fp16).")
    ] = FloatDtype.fp32,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
) -> None:
    """Export a binary model for deployment: packed 1-bit weights, ONNX or QONNX."""
    written = binarize.export(file, output, export_format.value, float_dtype=float_dtype.value, force=force)
    err_console.print(
        f"wrote {written} ({_size(written.stat().st_size)}; {file.name} is {_size(file.stat().st_size)})",
        highlight=False,
    )
