"""Deployable export: the packed 1-bit model file, ONNX and QONNX, and ``bench``.

* :func:`export` writes a converted model (or a binarize model file) as a packed file
  (``format: "binarize-packed"``), plain ONNX, or QONNX;
* :func:`pack` builds the packed, inference-only model in memory (BatchNorms folded in float64);
* :func:`load_packed` reads a packed file back; :func:`file_format` tells a training file from a packed one;
* :func:`bench` times the float, simulated and packed models (and onnxruntime) on this CPU.

Flow, file layout and figures: docs/deploy.md. Importing this package imports neither onnx nor the
native kernel; the ONNX exports import ``onnx`` (and ``qonnx``) when called.

``binarize.export(...)`` is :func:`export`; ``binarize.load`` opens packed files too.
"""

from __future__ import annotations

from binarize.deploy.api import FORMATS, export, packed_model
from binarize.deploy.folding import pack
from binarize.deploy.onnx_export import export_onnx
from binarize.deploy.packed_file import (
    FORMAT,
    FORMAT_VERSION,
    PackedFileHeader,
    file_format,
    load_packed,
    read_packed_header,
    save_packed,
)
from binarize.deploy.record import ExportError, PackedLayerRecord, PackedRecord, packed_meta
from binarize.deploy.timing import BenchResult, BenchRow, bench, machine_line

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "BenchResult",
    "BenchRow",
    "ExportError",
    "PackedFileHeader",
    "PackedLayerRecord",
    "PackedRecord",
    "bench",
    "export",
    "export_onnx",
    "file_format",
    "load_packed",
    "machine_line",
    "pack",
    "packed_meta",
    "packed_model",
    "read_packed_header",
    "save_packed",
]
