"""What every command shares: one-line errors, output formats, output paths, model building and warnings."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from torch import nn

import binarize
import binarize.files
import binarize.models

__all__ = [
    "DEBUG_ENV",
    "OutputFormat",
    "build_model",
    "check_output_file",
    "check_run_dir",
    "console",
    "errors_as_one_line",
    "example_inputs",
    "fail",
    "parse_input_size",
    "print_json",
    "print_warnings",
    "stderr",
]

DEBUG_ENV = "BINARIZE_DEBUG"
"""Set this environment variable (to anything but 0) to see tracebacks instead of one-line errors."""
HUB_HOST = "huggingface.co"
DEFAULT_INPUT_SIZE = (3, 224, 224)

console = Console()
stderr = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


FormatOption = Annotated[OutputFormat, typer.Option("--format", "-f", help="table (readable) or json (stdout only).")]
OfflineOption = Annotated[
    bool | None,
    typer.Option(
        "--offline/--online",
        help="Never download (pretrained weights and hf-hub: models come from the local caches). "
        f"Default: offline when HF_HUB_OFFLINE is set or {HUB_HOST} does not resolve.",
        show_default=False,
    ),
]


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def fail(message: str, code: int = 2) -> None:
    """Prints ``error: message`` on stderr and exits with ``code``."""
    sys.stderr.write(f"error: {message}\n")  # one write: lines of several processes do not interleave
    sys.stderr.flush()
    raise typer.Exit(code)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def errors_as_one_line(fn: Callable) -> Callable:
    """Turns errors into one line on stderr and a non-zero exit (a traceback with BINARIZE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except binarize.BinarizeError as err:
            if _debug():
                raise
            fail(_first_line(err) or type(err).__name__, err.exit_code)
        except KeyboardInterrupt:
            if _debug():
                raise
            fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - the user sees one line; BINARIZE_DEBUG=1 shows the rest
            if _debug():
                raise
            fail(f"unexpected {type(err).__name__}: {_first_line(err)} (set {DEBUG_ENV}=1 to see the traceback)", 1)

    return wrapper


def print_json(data: Any) -> None:
    """Writes ``data`` as JSON to stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """One plain line on stderr (never wrapped or split, whatever the terminal width)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def print_warnings(model: nn.Module) -> None:
    """The conversion record's warnings, one ``warning: ...`` line each on stderr."""
    record = binarize.binarize_meta(model)
    for warning in getattr(record, "warnings", None) or ():
        note(f"warning: {warning}")


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise binarize.BinarizeError(f"--input-size takes C,H,W such as 3,224,224, got {text!r}")
    return size


def example_inputs(model: nn.Module, size: Sequence[int] | None) -> tuple[torch.Tensor]:
    """One zero image for tracing: ``size``, else the model's timm ``pretrained_cfg`` input size, else 3x224x224."""
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") or DEFAULT_INPUT_SIZE
    return (torch.zeros(1, *size),)


def check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and num_classes < 0:
        raise binarize.BinarizeError(
            f"--num-classes must be >= 0 (0 builds the model without its head), got {num_classes}"
        )


def _accepts_new_files(path: Path, folder: Path) -> None:
    """The deepest existing folder at or above ``folder`` (where ``path`` goes) is a directory that accepts a
    new file (probed: permission bits do not say it for root under /proc or on a read-only mount)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise binarize.BinarizeError(f"cannot write {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise binarize.BinarizeError(
            f"cannot write {path}: {existing} does not accept new files ({err.strerror or type(err).__name__})"
        ) from None


def check_output_file(path: Path, force: bool) -> Path:
    """Checks, before any work, that the output file can be written (``binarize.files.check_output_path``
    and a probe of the folder it goes into)."""
    binarize.files.check_output_path(path, force=force)
    _accepts_new_files(path, path.parent)
    return path


def check_run_dir(path: Path) -> Path:
    """Checks, before any work, that a run directory can be created or written at ``path``."""
    if path.exists() and not path.is_dir():
        raise binarize.BinarizeError(f"output {path} is a file, not a directory: choose another --output")
    _accepts_new_files(path, path)
    return path


def hub_unreachable(host: str = HUB_HOST) -> bool:
    """Whether ``host`` does not resolve (the command decides from it to work offline)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def decide_offline(offline: bool | None, spec: str, pretrained: bool, weights: Path | None) -> bool:
    """``--offline/--online`` as given; else offline when HF_HUB_OFFLINE is set, or when a download is
    needed (pretrained weights, an hf-hub: model) and the Hub's host does not resolve."""
    if offline is not None:
        return offline
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    downloads = spec.strip().startswith("hf-hub:") or (pretrained and weights is None)
    return downloads and not spec.strip().startswith(("local-dir:",)) and hub_unreachable()


def build_model(
    spec: str,
    *,
    pretrained: bool,
    num_classes: int | None,
    weights: Path | None,
    offline: bool,
    pretrained_hint: str = "--no-pretrained",
    num_classes_origin: str = "--num-classes",
    report: bool = True,
) -> nn.Module:
    """``binarize.create_model`` with the command line's words in its errors, and one line saying what
    ``--weights`` loaded."""
    try:
        model = binarize.create_model(
            spec, pretrained=pretrained, num_classes=num_classes, weights=weights, offline=offline
        )
    except binarize.models.PretrainedUnavailable as err:
        if spec.strip().startswith("hf-hub:"):
            raise binarize.BinarizeError(
                f"{err.reason}; connect to the network, or name the architecture (e.g. resnet18) with --weights FILE"
            ) from err
        raise binarize.BinarizeError(f"{err.reason}; pass --weights FILE or {pretrained_hint}") from err
    except binarize.models.NumClassesNotAccepted as err:
        raise binarize.BinarizeError(
            f"{err.factory}() takes no num_classes argument, but num_classes={err.num_classes} was given "
            f"({num_classes_origin}); drop it or add the parameter to {err.factory}()"
        ) from err
    summary = binarize.models.loaded_weights(model)
    if summary is not None and report:
        note(summary.line())
    return model
