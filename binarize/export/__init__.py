"""Deployable export: the packed 1-bit model file, ONNX and QONNX, and ``bench``.

* :func:`export` writes a converted model (or a binarize model file) as a packed file
  (``format: "binarize-packed"``), plain ONNX, or QONNX;
* :func:`pack` builds the packed, inference-only model in memory (BatchNorms folded in float64);
* :func:`load_packed` reads a packed file back; :func:`file_format` tells a training file from a packed one;
* :func:`bench` times the float, simulated and packed models (and onnxruntime) on this CPU.

Flow, file layout and figures: docs/export.md. Importing this package imports neither onnx nor the
native kernel; the ONNX exports import ``onnx`` (and ``qonnx``) when called.

The package is also callable, ``binarize.export(model, path, ...)`` being :func:`export`, so that the
name can serve both as the function and as this namespace.
"""

from __future__ import annotations

import sys
import types

from binarize.export.api import FORMATS, export, packed_model
from binarize.export.folding import pack
from binarize.export.layer import NATIVE_RUNTIME
from binarize.export.onnx_export import export_onnx
from binarize.export.packed_file import (
    FORMAT,
    FORMAT_VERSION,
    PackedFileHeader,
    file_format,
    load_packed,
    read_packed_header,
    save_packed,
)
from binarize.export.record import ExportError, PackedLayerRecord, PackedRecord, packed_meta
from binarize.export.timing import BenchResult, BenchRow, bench, machine_line

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "NATIVE_RUNTIME",
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


class _CallableModule(types.ModuleType):
    """This package's module type: calling it calls :func:`export`."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
