"""The packed file (``format: "binarize-packed"``): a deployable model in one safetensors file.

The tensors are the packed model's state dict: per binary convolution ``<name>.weight_bits`` (uint8),
``<name>.mul`` and ``<name>.add`` (float32) and ``<name>.activation_bias`` (float32, when the layer has
one); the float layers' parameters and buffers in float32, or in float16 with ``float_dtype="fp16"``
(normalisation layers stay float32: they are tiny, and float16 would flush small variances). There are no
latent float weights, no tau, nothing of training. The header's metadata holds, under the key
``binarize``, a JSON document (docs/deploy.md)::

    {"format": "binarize-packed", "format_version": 1, "library_version": "0.1.0",
     "source": {"spec": "cifar_resnet20", "num_classes": 10},   # null for a model built by user code
     "conversion": {...},   # the ConversionRecord: policy, layer options, input size, decisions
     "packed": {...},       # the PackedRecord: every binary conv's shape and folded BatchNorm, float folds, float dtype
     "run": {...}}          # the RunRecord of the training file: metrics, data settings, classes

Loading rebuilds the float model from ``source`` (or takes ``model=``), converts it with the recorded
policy and layer options, swaps in empty packed layers and identities for the folded BatchNorms, and loads
the tensors strictly (float16 ones cast back to float32).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from binarize._utils import default_example_inputs, unwrap
from binarize._version import __version__
from binarize.conversion.pipeline import convert
from binarize.conversion.record import RECORD_ATTR, ConversionRecord, binarize_meta
from binarize.deploy import layer as _layer
from binarize.deploy.folding import _RUN_ATTR, build_shell, channels_last_float_convs, make_inference_only
from binarize.deploy.record import PACKED_ATTR, PackedRecord, packed_meta
from binarize.errors import BinarizeError, FileFormatError, WeightsError
from binarize.files import PACKED_FORMAT, RunRecord, atomic_write, read_document
from binarize.models import SOURCE_ATTR, create_model
from binarize.weights import load_weights

__all__ = [
    "FLOAT_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "PackedFileHeader",
    "file_format",
    "load_packed",
    "read_packed_header",
    "save_packed",
]

FORMAT = PACKED_FORMAT
FORMAT_VERSION = 1
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_KEY = "binarize"  # the metadata key, shared with the training format (binarize.files)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclasses.dataclass(frozen=True)
class PackedFileHeader:
    """What a packed file's metadata says.

    Attributes:
        format_version: The file's format version.
        library_version: The binarize version that wrote it.
        source: How to rebuild the float model, or None for a model built by user code.
        conversion: The conversion record of the model that was packed.
        packed: What packing did (binary layers, folded BatchNorms, float dtype).
        run: The run facts of the training file.
    """

    format_version: int
    library_version: str
    source: dict[str, Any] | None
    conversion: ConversionRecord
    packed: PackedRecord
    run: RunRecord


def file_format(path: str | Path) -> str:
    """The format of a binarize file: ``"binarize"`` (a training file) or ``"binarize-packed"``.

    Raises:
        FileFormatError: The path is no file, not safetensors, truncated, or not a binarize model.
    """
    return read_document(path)["format"]


def read_packed_header(path: str | Path) -> PackedFileHeader:
    """The typed metadata of a packed file.

    Raises:
        FileFormatError: Not a packed file, a newer format version, or corrupt metadata.
    """
    path = Path(path)
    document = read_document(path)
    if document["format"] != FORMAT:
        raise FileFormatError(f"{path} is a binarize training file, not a packed one: load it with binarize.load")
    version = document.get("format_version")
    if not isinstance(version, int):
        raise FileFormatError(f"{path}: corrupt binarize metadata (no format version)")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has packed format version {version}; this binarize reads up to {FORMAT_VERSION}: upgrade binarize"
        )
    try:
        return PackedFileHeader(
            format_version=version,
            library_version=str(document.get("library_version", "")),
            source=document.get("source"),
            conversion=ConversionRecord.from_dict(document["conversion"], "conversion"),
            packed=PackedRecord.from_dict(document["packed"], "packed"),
            run=RunRecord.from_dict(document.get("run") or {}, "run"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: corrupt binarize metadata ({type(err).__name__}: {err})") from err


def _kept_float32(model: nn.Module) -> set[str]:
    """Names of the modules whose tensors the file keeps in float32 whatever ``float_dtype`` says."""
    return {name for name, m in model.named_modules() if isinstance(m, _NORMS) or _layer.is_packed_layer(m)}


def _file_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    kept = _kept_float32(model)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if value.is_floating_point() and key.rpartition(".")[0] not in kept:
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    return tensors


def save_packed(model: nn.Module, path: str | Path, *, float_dtype: str = "fp32", force: bool = False) -> Path:
    """Writes a packed model (from :func:`binarize.deploy.pack`) as a packed file, atomically.

    Args:
        model: The packed model.
        path: Destination (``.safetensors`` recommended).
        float_dtype: ``fp32`` or ``fp16``: how the float layers' tensors are stored.
        force: Replace an existing file.

    Returns:
        The path written.
    """
    model = unwrap(model)
    record, conversion = packed_meta(model), binarize_meta(model)
    if record is None or conversion is None:
        raise BinarizeError("save_packed() takes a model returned by binarize.deploy.pack()")
    if float_dtype not in FLOAT_DTYPES:
        raise BinarizeError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {float_dtype!r}")
    record = record.replace(float_dtype=float_dtype)
    run = getattr(model, _RUN_ATTR, None) or RunRecord()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "source": getattr(model, SOURCE_ATTR, None),
        "conversion": conversion.to_dict(),
        "packed": record.to_dict(),
        "run": run.to_dict(),
    }
    tensors = _file_tensors(model, FLOAT_DTYPES[float_dtype])
    metadata = {_KEY: json.dumps(document)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force=force)


def _check_packed_dtypes(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    for name, layer in _layer.packed_layers(model):
        for key, value in layer.state_dict().items():
            stored = state.get(f"{name}.{key}")
            if stored is not None and stored.dtype != value.dtype:
                raise FileFormatError(
                    f"{path}: {name}.{key} is stored as {stored.dtype}, a packed layer holds {value.dtype}"
                )


def load_packed(path: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a packed file as an inference-only module.

    Args:
        path: The packed file.
        model: The float model, for models built by user code (the file then records no source); by
            default it is rebuilt from the file's source specification.
        device: Where to put the tensors.

    Returns:
        The packed model in eval mode, without gradients; ``.train()`` raises a one-line error.
        :func:`~binarize.deploy.record.packed_meta` and :func:`binarize.binarize_meta` give its records,
        ``binarize.run_record`` its run facts.

    Raises:
        FileFormatError: The file is missing, truncated, corrupt, not a packed file, or does not fit the model.
    """
    path = Path(path)
    header = read_packed_header(path)
    source = header.source
    if model is None:
        if not source:
            raise FileFormatError(
                f"{path} was exported from a model built by your code; pass it: "
                "binarize.deploy.load_packed(path, model=float_model)"
            )
        model = create_model(source["spec"], num_classes=source.get("num_classes"))
    conversion = header.conversion
    inputs = default_example_inputs(model, conversion.input_size)
    binary = convert(model, conversion.policy, inputs, layer=conversion.layer)
    try:
        build_shell(binary, header.packed)
    except BinarizeError as err:
        raise FileFormatError(f"{path}: {err}") from err
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileFormatError(f"{path}: cannot read the tensors, the file is corrupt or truncated ({reason})") from err
    _check_packed_dtypes(binary, state, path)
    binary.float()
    try:
        load_weights(binary, state)
    except WeightsError as err:
        raise FileFormatError(f"{path}: {err}") from err
    binary.to(device)
    setattr(binary, RECORD_ATTR, conversion)
    setattr(binary, PACKED_ATTR, header.packed)
    setattr(binary, _RUN_ATTR, header.run)
    if source:
        setattr(binary, SOURCE_ATTR, source)
    return make_inference_only(channels_last_float_convs(binary))
