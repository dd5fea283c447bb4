"""The binarize model file: weights in safetensors, the recipe for rebuilding them in JSON.

One ``.safetensors`` file holds the converted model's state dict; its header metadata holds, under
the key ``binarize``, a JSON document::

    {"format": "binarize", "format_version": 1, "library_version": "0.1.0",
     "source": {"spec": "resnet18", "num_classes": 10},   # null for a model built by user code
     "policy": {...}, "input_size": [3, 32, 32], "extra": {...}}

Loading rebuilds the float model from ``source`` (or takes the one the caller passes), re-applies
the conversion with the recorded policy and input size, and loads the weights strictly. Nothing is
pickled. Files are written atomically (a temporary file, then a rename) and an existing file is only
replaced when asked.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from binarize._utils import default_example_inputs, unwrap
from binarize._version import __version__
from binarize.conversion.pipeline import binarize_meta, convert
from binarize.conversion.policy import Policy
from binarize.errors import BinarizeError, FileFormatError
from binarize.models import SOURCE_ATTR, create_model
from binarize.weights import load_weights

__all__ = ["save", "load", "read_metadata", "atomic_write", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_KEY = "binarize"


def atomic_write(path: str | Path, write, *, force: bool = False) -> Path:
    """Writes a file through ``write(tmp_path)`` into a temporary sibling, then renames it into place.

    Args:
        path: Destination.
        write: Function that writes the content to the path it is given.
        force: Replace an existing file; without it an existing file is an error.
    """
    path = Path(path)
    if path.exists() and not force:
        raise BinarizeError(f"{path} already exists; pass --force (force=True) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def save(model: nn.Module, path: str | Path, *, force: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Saves a converted model as one safetensors file with its rebuild metadata.

    Args:
        model: A model returned by :func:`binarize.convert` (or :func:`load`).
        path: Destination file (``.safetensors`` recommended).
        force: Overwrite an existing file.
        extra: JSON-serialisable facts to keep with the model (the engine stores metrics here).

    Returns:
        The path written.
    """
    model = unwrap(model)
    meta = binarize_meta(model)
    if meta is None:
        raise BinarizeError("save() takes a model returned by binarize.convert() or binarize.load()")
    document = {
        "format": _KEY,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "source": getattr(model, SOURCE_ATTR, None),
        "policy": meta["policy"],
        "input_size": meta["input_size"],
        "extra": extra or {},
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_KEY: json.dumps(document)}), force=force)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a binarize file, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:
        raise FileFormatError(f"{path} is not a safetensors file ({type(err).__name__})") from err
    if _KEY not in header:
        raise FileFormatError(f"{path} is a safetensors file but not a binarize model (no '{_KEY}' metadata)")
    try:
        document = json.loads(header[_KEY])
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: corrupt binarize metadata ({err.msg})") from err
    version = document.get("format_version")
    if document.get("format") != _KEY or not isinstance(version, int):
        raise FileFormatError(f"{path}: corrupt binarize metadata (no format version)")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has format version {version}; this binarize reads up to {FORMAT_VERSION}: upgrade binarize"
        )
    return document


def load(path: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a model saved by :func:`save`.

    Args:
        path: The file.
        model: The float model to convert, for models built by user code (the file then records no
            source); by default the model is rebuilt from the file's source specification.
        device: Where to put the weights.

    Returns:
        The converted model with the saved weights, in eval mode; its ``binarize_meta["extra"]`` holds
        the file's ``extra`` dict.
    """
    document = read_metadata(path)
    source = document.get("source")
    if model is None:
        if not source:
            raise FileFormatError(
                f"{path} was converted from a model built by your code; pass it: binarize.load(path, model=float_model)"
            )
        model = create_model(source["spec"], num_classes=source.get("num_classes"))
    policy = Policy.from_dict(document["policy"], "policy")
    binary = convert(model, policy, default_example_inputs(model, document.get("input_size")))
    if source and not hasattr(binary, SOURCE_ATTR):
        setattr(binary, SOURCE_ATTR, source)
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:
        raise FileFormatError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from err
    binary.to(device)
    load_weights(binary, state)
    binarize_meta(binary)["extra"] = document.get("extra", {})
    return binary.eval()
