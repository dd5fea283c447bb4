"""``binarize.deploy.export``: one entry for the packed, ONNX and QONNX exports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from binarize._utils import nearest, unwrap
from binarize.deploy.folding import pack
from binarize.deploy.onnx_export import export_onnx
from binarize.deploy.packed_file import FLOAT_DTYPES, FORMAT, file_format, load_packed, save_packed
from binarize.deploy.record import packed_meta
from binarize.errors import BinarizeError
from binarize.files import check_output_path

__all__ = ["FORMATS", "export", "packed_model"]

FORMATS = ("packed", "onnx", "qonnx")


def packed_model(model_or_file: nn.Module | str | Path, *, fold_float_bn: bool = True) -> nn.Module:
    """The packed model of a converted model, a binarize training file or a packed file."""
    if isinstance(model_or_file, (str, Path)):
        path = Path(model_or_file)
        if file_format(path) == FORMAT:
            return load_packed(path)
        from binarize.files import load

        model_or_file = load(path)
    model = unwrap(model_or_file)
    return model if packed_meta(model) is not None else pack(model, fold_float_bn=fold_float_bn)


def export(
    model_or_file: nn.Module | str | Path,
    path: str | Path,
    format: str = "packed",
    *,
    float_dtype: str = "fp32",
    force: bool = False,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    fold_float_bn: bool = True,
) -> Path:
    """Exports a binary model for deployment.

    Args:
        model_or_file: A model from :func:`binarize.convert` / :func:`binarize.load` (also one built by your
            code and converted), a binarize model file (loaded with :func:`binarize.load`), or a packed file.
        path: Destination file.
        format: ``packed`` (a safetensors file of 1-bit weights, :func:`load_packed` reads it), ``onnx``
            (plain ONNX that onnxruntime runs) or ``qonnx`` (ONNX with ``BipolarQuant``, for FINN).
        float_dtype: How a packed file stores the float layers: ``fp32`` or ``fp16`` (packed only).
        force: Replace an existing file.
        example_inputs: The input to trace the ONNX export with (default: zero images of the conversion's
            input size).
        fold_float_bn: Also fold BatchNorms into the float convs before them (see :func:`pack`).

    Returns:
        The path written.

    Raises:
        ExportError: A layer cannot be exported (the message names it).
        BinarizeError: A bad format or float dtype, an existing output without ``force``, an unreadable input.

    Example::

        >>> binarize.deploy.export("resnet20-binary.safetensors", "resnet20.packed.safetensors")
        >>> model = binarize.deploy.load_packed("resnet20.packed.safetensors")
    """
    if format not in FORMATS:
        hint = nearest(str(format), FORMATS)
        raise BinarizeError(f"format must be one of {', '.join(FORMATS)}, got {format!r}{hint}")
    if float_dtype not in FLOAT_DTYPES:
        raise BinarizeError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {float_dtype!r}")
    if format != "packed" and float_dtype != "fp32":
        raise BinarizeError(f"float_dtype={float_dtype} applies to packed files; {format} files keep float32")
    check_output_path(path, force=force)
    packed = packed_model(model_or_file, fold_float_bn=fold_float_bn)
    if format == "packed":
        return save_packed(packed, path, float_dtype=float_dtype, force=force)
    return export_onnx(packed, path, qonnx=format == "qonnx", example_inputs=example_inputs, force=force)
