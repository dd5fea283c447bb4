"""The binarize model file: weights in safetensors, the recipe for rebuilding them in JSON.

One ``.safetensors`` file holds the converted model's state dict; its header metadata holds, under
the key ``binarize``, a JSON document (format version 2)::

    {"format": "binarize", "format_version": 2, "library_version": "0.1.0",
     "source": {"spec": "resnet18", "num_classes": 10},   # null for a model built by user code
     "conversion": {...},   # the ConversionRecord: policy, layer options, input size, decisions, ...
     "run": {...}}          # the RunRecord: metrics, data settings, class names, extra

Loading rebuilds the float model from ``source`` (or takes the one the caller passes), re-applies
the conversion with the recorded policy, layer options and input size, and loads the weights
strictly. Files of format version 1 (``policy``, ``input_size`` and ``extra`` at the top level) are
read too. Nothing is pickled. Files are written atomically (a temporary file, then a rename) and an
existing file is only replaced when asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from binarize._utils import default_example_inputs, set_preserved_attr, unwrap
from binarize._version import __version__
from binarize.config import Config
from binarize.conversion.pipeline import convert
from binarize.conversion.policy import MOVED_TO_LAYER_OPTIONS, Policy
from binarize.conversion.policy import VERSION as POLICY_VERSION
from binarize.conversion.record import ConversionRecord, binarize_meta
from binarize.data import ResolvedData
from binarize.errors import BinarizeError, ConfigError, FileFormatError
from binarize.models import SOURCE_ATTR, create_model
from binarize.nn import LayerOptions
from binarize.weights import load_weights

__all__ = [
    "FORMAT_VERSION",
    "ModelFileHeader",
    "RunRecord",
    "atomic_write",
    "check_output_path",
    "load",
    "read_document",
    "read_header",
    "read_metadata",
    "run_record",
    "save",
]

FORMAT_VERSION = 2
_KEY = "binarize"
PACKED_FORMAT = "binarize-packed"
"""The ``format`` of a packed deployment file (:mod:`binarize.deploy`); :func:`load` opens both kinds."""
RUN_ATTR = "binarize_run"


@dataclasses.dataclass(frozen=True)
class RunRecord(Config):
    """Facts of the run that wrote a model file, kept beside the weights.

    Args:
        metrics: The epoch's metrics (the engine writes its metrics record here).
        data: The data settings the model was trained and evaluated with.
        classes: The class names, in label order.
        extra: Anything else the caller keeps with the model (JSON-serialisable).
    """

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: ResolvedData | None = None
    classes: tuple[str, ...] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_v1_extra(cls, extra: Any) -> RunRecord:
        """Reads the free-form ``extra`` dict of a format-1 file (the engine's keys become fields)."""
        if not isinstance(extra, dict):
            return cls()
        rest = dict(extra)
        fields: dict[str, Any] = {}
        if isinstance(rest.get("metrics"), dict):
            fields["metrics"] = rest.pop("metrics")
        if isinstance(rest.get("data"), dict):
            try:
                fields["data"] = ResolvedData.from_dict(rest["data"], "data")
                rest.pop("data")
            except ConfigError:
                pass
        if isinstance(rest.get("classes"), list) and all(isinstance(c, str) for c in rest["classes"]):
            fields["classes"] = tuple(rest.pop("classes"))
        return cls(extra=rest, **fields)


@dataclasses.dataclass(frozen=True)
class ModelFileHeader:
    """What a model file's metadata says, whatever its format version.

    Attributes:
        format_version: The file's format version.
        library_version: The binarize version that wrote it.
        source: How to rebuild the float model (``{"spec": ..., "num_classes": ...}``), or None for
            a model built by user code.
        policy: The conversion's policy.
        layer: The options of its binary layers.
        input_size: The example input size the conversion used.
        run: The run facts.
        conversion: The full conversion record (None in format-1 files, which stored only the inputs).
    """

    format_version: int
    library_version: str
    source: dict[str, Any] | None
    policy: Policy
    layer: LayerOptions
    input_size: tuple[int, ...]
    run: RunRecord
    conversion: ConversionRecord | None


def check_output_path(path: str | Path, *, force: bool = False) -> Path:
    """Checks, before any work is done, that a file can be written at ``path``.

    Raises:
        BinarizeError: The path is a directory, lies under a file, cannot be created or written, or
            exists and ``force`` is off.
    """
    path = Path(path)
    if path.is_dir():
        raise BinarizeError(
            f"{path} is a directory; give a file name for the output (e.g. {path / 'model.safetensors'})"
        )
    if path.exists() and not force:
        raise BinarizeError(f"{path} already exists; pass --force (force=True) to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BinarizeError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BinarizeError(f"cannot write {path}: {parent} is not writable")
    return path


def atomic_write(path: str | Path, write, *, force: bool = False) -> Path:
    """Writes a file through ``write(tmp_path)`` into a temporary sibling, then renames it into place.

    Args:
        path: Destination.
        write: Function that writes the content to the path it is given.
        force: Replace an existing file; without it an existing file is an error.
    """
    path = check_output_path(path, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise BinarizeError(f"cannot write {path}: {err.strerror or type(err).__name__}") from err
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save(
    model: nn.Module,
    path: str | Path,
    *,
    force: bool = False,
    extra: dict[str, Any] | None = None,
    run: RunRecord | None = None,
) -> Path:
    """Saves a converted model as one safetensors file with its rebuild metadata.

    Args:
        model: A model returned by :func:`binarize.convert` (or :func:`load`).
        path: Destination file (``.safetensors`` recommended).
        force: Overwrite an existing file.
        extra: JSON-serialisable facts to keep with the model (stored as the run record's ``extra``).
        run: The run facts (the engine stores its metrics, data settings and class names here).

    Returns:
        The path written.
    """
    model = unwrap(model)
    record = binarize_meta(model)
    if record is None:
        raise BinarizeError("save() takes a model returned by binarize.convert() or binarize.load()")
    run = run if run is not None else RunRecord()
    if extra:
        run = run.replace(extra={**run.extra, **extra})
    document = {
        "format": _KEY,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "source": getattr(model, SOURCE_ATTR, None),
        "conversion": record.to_dict(),
        "run": run.to_dict(),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_KEY: json.dumps(document)}), force=force)


def read_document(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a binarize file of either kind (training ``binarize`` or ``binarize-packed``).

    Raises:
        FileFormatError: The path is a directory or no file, not safetensors (or truncated), or not a
            binarize model.
    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(
            f"{path} is a directory, not a model file; give a .safetensors file "
            "(a run directory holds best.safetensors and last.safetensors)"
        )
    if not path.is_file():
        raise FileFormatError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:
        raise FileFormatError(f"{path} is not a safetensors file or is truncated ({type(err).__name__})") from err
    if _KEY not in header:
        raise FileFormatError(f"{path} is a safetensors file but not a binarize model (no '{_KEY}' metadata)")
    try:
        document = json.loads(header[_KEY])
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: corrupt binarize metadata ({err.msg})") from err
    if not isinstance(document, dict) or document.get("format") not in (_KEY, PACKED_FORMAT):
        raise FileFormatError(f"{path}: corrupt binarize metadata (no known format)")
    return document


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a binarize training file as stored, checked for format and version."""
    document = read_document(path)
    version = document.get("format_version")
    if document["format"] == PACKED_FORMAT:
        raise FileFormatError(f"{path} is a packed file (binarize export); binarize.load opens it")
    if not isinstance(version, int):
        raise FileFormatError(f"{path}: corrupt binarize metadata (no format version)")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has format version {version}; this binarize reads up to {FORMAT_VERSION}: upgrade binarize"
        )
    return document


def read_header(path: str | Path) -> ModelFileHeader:
    """The typed metadata of a binarize file (format version 1 or 2)."""
    document = read_metadata(path)
    try:
        if document["format_version"] == 1:
            policy_data = dict(document["policy"])
            layer = LayerOptions(**{k: policy_data.pop(k) for k in MOVED_TO_LAYER_OPTIONS if k in policy_data})
            if policy_data.get("version", 1) == 1:
                policy_data["version"] = POLICY_VERSION
            return ModelFileHeader(
                format_version=1,
                library_version=str(document.get("library_version", "")),
                source=document.get("source"),
                policy=Policy.from_dict(policy_data, "policy"),
                layer=layer,
                input_size=tuple(document["input_size"]),
                run=RunRecord.from_v1_extra(document.get("extra")),
                conversion=None,
            )
        conversion = ConversionRecord.from_dict(document["conversion"], "conversion")
        return ModelFileHeader(
            format_version=document["format_version"],
            library_version=str(document.get("library_version", "")),
            source=document.get("source"),
            policy=conversion.policy,
            layer=conversion.layer,
            input_size=conversion.input_size,
            run=RunRecord.from_dict(document.get("run") or {}, "run"),
            conversion=conversion,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: corrupt binarize metadata ({type(err).__name__}: {err})") from err


def run_record(model: nn.Module) -> RunRecord | None:
    """The run facts of a model loaded by :func:`load` (None for a model not loaded from a file)."""
    return getattr(unwrap(model), RUN_ATTR, None)


def load(path: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a model saved by :func:`save`.

    Args:
        path: The file.
        model: The float model to convert, for models built by user code (the file then records no
            source); by default the model is rebuilt from the file's source specification.
        device: Where to put the weights.

    Returns:
        The converted model with the saved weights, in eval mode; :func:`run_record` gives the file's
        run facts. A packed file (``binarize export``) gives the inference-only packed model
        (:func:`binarize.deploy.load_packed`).
    """
    if read_document(path)["format"] == PACKED_FORMAT:
        from binarize.deploy import load_packed

        return load_packed(path, model, device=device)
    header = read_header(path)
    source = header.source
    if model is None:
        if not source:
            raise FileFormatError(
                f"{path} was converted from a model built by your code; pass it: binarize.load(path, model=float_model)"
            )
        model = create_model(source["spec"], num_classes=source.get("num_classes"))
    from binarize.conversion.registry import import_class  # here: only load resolves recorded leaf classes

    leaf_modules = []
    for name in header.conversion.leaf_modules if header.conversion else ():
        try:
            leaf_modules.append(import_class(name))
        except ConfigError as err:
            raise FileFormatError(f"{path} needs the leaf module {name}: {err}") from err
    binary = convert(
        model,
        header.policy,
        default_example_inputs(model, header.input_size),
        layer=header.layer,
        leaf_modules=leaf_modules,
    )
    if source and not hasattr(binary, SOURCE_ATTR):
        set_preserved_attr(binary, SOURCE_ATTR, source)
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:
        raise FileFormatError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from err
    binary.to(device)
    load_weights(binary, state)
    set_preserved_attr(binary, RUN_ATTR, header.run)
    return binary.eval()
