"""Reading real-world checkpoint files into a plain state dict, and fitting one to a model.

Checkpoints found in the wild are rarely a bare ``{name: tensor}`` dict. They nest the weights under
``state_dict`` or ``model``, carry a ``module.`` prefix from ``nn.DataParallel`` / DDP or an ``_orig_mod.``
prefix from ``torch.compile``, hold epochs and optimizer state beside the weights, were saved on a GPU, or
lack the BatchNorm ``num_batches_tracked`` buffers of older PyTorch versions. :func:`read_state_dict` turns
all of these into one flat dict of CPU tensors; :func:`load_weights` checks that dict against a model,
reports every mismatch on one line, and returns a :class:`LoadSummary` of what it loaded (it prints
nothing). Asked to, it re-initialises a classifier head whose shape does not fit (weights trained for
another label set): only the head, never another layer.

Pickled checkpoints are read with ``torch.load(..., weights_only=True)``: binarize never executes code
stored in a weights file (see the "weights_only" notes of ``torch.load``). Safetensors files are read with
``safetensors.torch.load_file``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from binarize.errors import WeightsError

__all__ = ["WRAPPER_KEYS", "LoadSummary", "head_names", "load_weights", "read_state_dict"]

#: Keys under which checkpoints nest their weights, in the order they are tried. The plain model comes
#: before its exponential moving average (EMA): a file holding both yields the plain weights.
WRAPPER_KEYS: tuple[str, ...] = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "model_ema",
    "state_dict_ema",
    "ema",
)

_PICKLE_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DistributedDataParallel, torch.compile
_MAX_NESTING = 3
_MAX_NAMES = 5


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads a weights file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; ``.pt``, ``.pth``, ``.th``,
    ``.bin`` and ``.ckpt`` files (and files with other suffixes that are not safetensors) with
    ``torch.load(path, map_location="cpu", weights_only=True)``, so checkpoints saved on a GPU load on a
    CPU-only machine and no pickled code is ever executed.

    The result is normalised:

    * Nested weights are unwrapped: if the loaded dict has one of :data:`WRAPPER_KEYS` (``state_dict``,
      ``model_state_dict``, ``model``, ``module``, ``net``, then the EMA copies ``model_ema``,
      ``state_dict_ema``, ``ema``) holding a dict, that dict is used, the first key in this order
      winning; this repeats for up to three levels (e.g. ``{"model": {"state_dict": {...}}}``).
    * Entries that are not tensors (epochs, accuracies, optimizer state, hyper-parameters) are dropped.
    * A ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (``torch.compile``) prefix is stripped when
      every key carries it, repeatedly, so ``_orig_mod.module.conv1.weight`` becomes ``conv1.weight``.

    Args:
        path: The weights file.

    Returns:
        The tensors by parameter or buffer name, in the file's order.

    Raises:
        WeightsError: The file is missing, is not a readable weights file (corrupt, truncated, text, or
            a pickle that needs code to load), or holds no tensors. The message is one line.

    Example::

        >>> sd = read_state_dict("cifar10-resnet20-12fca82f.th")  # {"state_dict": {"module.conv1.weight": ...}}
        >>> next(iter(sd))
        'conv1.weight'
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, not a weights file; pass the file inside it")
    return _normalise(_load_file(path), f"weights file {path}")


@dataclasses.dataclass(frozen=True)
class LoadSummary:
    """What :func:`load_weights` did, for the caller to report (binarize's command line prints :meth:`line`).

    Attributes:
        source: The weights file, or None for a state dict passed in directly.
        loaded: How many of the file's tensors were loaded into the model.
        dropped: The file's tensors that were not loaded: names the model lacks (only with
            ``strict=False``) and the head of a model built without one (``num_classes=0``).
        kept: The model's tensors that the file lacks, which keep their values (only with ``strict=False``).
        head_reset: The head's tensors that keep the model's fresh initialisation because the file's do
            not fit (``reset_head=True``: weights trained for another label set).
    """

    source: str | None
    loaded: int
    dropped: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    head_reset: tuple[str, ...] = ()

    def line(self) -> str:
        """One line such as ``loaded 21 tensors from w.th (head re-initialised: fc.weight, fc.bias)``."""
        text = f"loaded {self.loaded} tensors" + (f" from {self.source}" if self.source else "")
        details = []
        if self.dropped:
            details.append(f"dropped: {_names(list(self.dropped))}")
        if self.kept:
            details.append(f"not in the file, left as they were: {_names(list(self.kept))}")
        if self.head_reset:
            details.append(f"head re-initialised: {_names(list(self.head_reset))}")
        return text + (f" ({'; '.join(details)})" if details else "")


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of a model's classifier head.

    timm's ``pretrained_cfg["classifier"]`` (one name or several; binarize's CIFAR models carry it too)
    where the model has those modules, else the last ``nn.Linear`` in module order; empty if neither.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = (names,) if isinstance(names, str) else tuple(n for n in (names or ()) if isinstance(n, str))
    modules = dict(model.named_modules())
    found = tuple(n for n in names if n and n in modules)
    if found:
        return found
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (linears[-1],) if linears else ()


def load_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    *,
    reset_head: bool = False,
) -> LoadSummary:
    """Loads a weights file (or an already read state dict) into a model, in place.

    The state dict is first normalised like :func:`read_state_dict` does (so the raw result of
    ``torch.load`` is accepted too). BatchNorm ``num_batches_tracked`` buffers missing from the file are
    added as zeros, and ones the model does not have are dropped, silently: they only count steps and
    old checkpoints lack them. Then names and shapes are compared with ``model.state_dict()``, and every
    mismatch is reported in one error, e.g.::

        weights do not fit the model: 2 missing (fc.weight, fc.bias), 1 unexpected (head.weight),
        1 wrong shape (conv1.weight: file [64, 3, 7, 7] vs model [64, 1, 7, 7])

    (on one line; at most five names per category, then "and N more").

    With ``reset_head``, weights trained for another label set load too: when the only tensors whose
    shapes differ belong to the classifier head (:func:`head_names`), every tensor of that head keeps
    the model's fresh initialisation and the rest loads; a model built without a head (``num_classes=0``)
    drops the file's head. Any other mismatch stays an error.

    Args:
        model: The model to load into; its parameters and buffers are overwritten.
        path_or_state_dict: A weights file path, or a mapping of names to tensors.
        strict: If true, missing and unexpected names are errors. If false, they are ignored (missing
            entries keep the model's values); wrong shapes are always an error.
        reset_head: Re-initialise a classifier head whose shape does not fit, instead of failing.

    Returns:
        A :class:`LoadSummary` of what was loaded, dropped and re-initialised (nothing is printed).

    Raises:
        WeightsError: The file cannot be read, or the weights do not fit the model.

    Example::

        >>> import timm, binarize.zoo
        >>> model = timm.create_model("cifar_resnet20")
        >>> load_weights(model, "cifar10-resnet20-12fca82f.th").line()
        'loaded 103 tensors from cifar10-resnet20-12fca82f.th'
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = _normalise(path_or_state_dict, "the state dict"), None
    else:
        state_dict, source = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    expected = model.state_dict()
    from_file = set(state_dict)

    for name, value in expected.items():  # BatchNorm step counters: add when absent, drop when unused
        if _is_step_counter(name) and name not in state_dict:
            state_dict[name] = torch.zeros_like(value, device="cpu")
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not _is_step_counter(k)}

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    heads = head_names(model)
    head_of = {k: next((h for h in heads if k.startswith(f"{h}.")), None) for k in (*state_dict, *expected)}
    head_reset: list[str] = []
    head_dropped: list[str] = []
    if reset_head and wrong and all(head_of[k] for k in wrong):
        hit = {head_of[k] for k in wrong}
        head_reset = [k for k in expected if head_of[k] in hit]
        wrong = []
    if reset_head and unexpected and all(head_of[k] for k in unexpected):
        if not any(head_of[k] for k in expected):  # the model was built without its head
            head_dropped, unexpected = unexpected, []

    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if wrong:
        shapes = [f"{k}: file {list(state_dict[k].shape)} vs model {list(expected[k].shape)}" for k in wrong]
        problems.append(f"{len(wrong)} wrong shape ({_names(shapes)})")
    if problems:
        hint = ""
        if not reset_head and wrong and not missing and not unexpected and all(head_of[k] for k in wrong):
            outputs = state_dict[wrong[0]].shape[0] if state_dict[wrong[0]].dim() else "?"
            hint = (
                f"; only the classifier head differs (the file's has {outputs} outputs): build the model for "
                f"{outputs} classes, or for the new number of classes to re-initialise the head"
            )
        raise WeightsError("weights do not fit the model: " + ", ".join(problems) + hint)
    skip = set(head_reset) | set(head_dropped)
    final = {k: v for k, v in state_dict.items() if k not in skip}
    final.update({k: expected[k] for k in head_reset})  # the model's own fresh initialisation
    model.load_state_dict(final, strict=strict)
    return LoadSummary(
        source=source,
        loaded=sum(1 for k in final if k in from_file and k in expected and k not in skip),
        dropped=tuple(head_dropped) + (tuple(unexpected) if not strict else ()),
        kept=tuple(missing) if not strict else (),
        head_reset=tuple(head_reset),
    )


def _load_file(path: Path) -> Any:
    """The object stored in ``path``, read safely; raises a one-line :class:`WeightsError`."""
    try:
        with path.open("rb") as f:
            head = f.read(1024)
        size = path.stat().st_size
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    use_safetensors = suffix == ".safetensors" or (suffix not in _PICKLE_SUFFIXES and _is_safetensors(head, size))
    try:
        if use_safetensors:
            return safetensors.torch.load_file(path, device="cpu")
        with warnings.catch_warnings():  # torch warns about unusual pickles before failing: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse means the file is not a usable weights file
        raise WeightsError(f"{path} is not a weights file ({_reason(e, head, size, use_safetensors)})") from e


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starts like safetensors: a little-endian u64 header length, then a JSON object."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _reason(error: Exception, head: bytes, size: int, was_safetensors: bool) -> str:
    """A short, single-line reason why a file could not be read."""
    if size == 0:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer; fetch the real file with 'git lfs pull'"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page; the download probably failed"
    if _is_text(head):
        return "it is a text file"
    text = str(error)
    if was_safetensors:
        return f"unreadable safetensors file: {_first_line(text)}"
    if not head.startswith((b"\x80", b"PK")):  # neither a pickle (protocol 2+) nor a zip archive
        return "unrecognised format: neither a PyTorch checkpoint nor a safetensors file"
    if "Weights only load failed" in text and _is_plain_pickle(head):
        return (
            "it is a plain pickle written by pickle.dump, which binarize will not execute; "
            "save the weights with torch.save(model.state_dict(), path) or as .safetensors"
        )
    if "Weights only load failed" in text and "Unsupported operand" in text:
        return (
            f"it uses pickle protocol {head[1]}, which torch's safe loader (weights_only=True) cannot read; "
            "save it again with torch.save(model.state_dict(), path) and the default protocol, or as .safetensors"
        )
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = found.group(1) if found else _first_line(text.split("WeightsUnpickler error:")[-1])
        return f"it contains pickled code that binarize will not execute: {detail}; save model.state_dict() instead"
    return _first_line(text) or type(error).__name__


_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # the number torch.save's old format starts with


def _is_plain_pickle(head: bytes) -> bool:
    """A pickle of protocol 3 or newer that does not start with torch.save's (legacy format) magic number."""
    return len(head) > 2 and head[0] == 0x80 and head[1] >= 3 and _TORCH_LEGACY_MAGIC not in head[:32]


def _is_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut by the 1024-byte read
    return True


def _first_line(text: str, limit: int = 120) -> str:
    """The first sentence of the first non-empty line of ``text``, at most ``limit`` characters."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _normalise(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwraps, filters and de-prefixes a loaded checkpoint; ``source`` names it in errors."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    top = obj
    for _ in range(_MAX_NESTING):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state_dict = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state_dict:
        what = f"top-level keys: {_names([str(k) for k in top])}" if top else "an empty dict"
        raise WeightsError(f"{source} holds no tensors ({what})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _is_step_counter(name: str) -> bool:
    return name == "num_batches_tracked" or name.endswith(".num_batches_tracked")


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown if len(items) <= _MAX_NAMES else f"{shown} and {len(items) - _MAX_NAMES} more"
