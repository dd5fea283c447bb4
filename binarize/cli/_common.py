"""What every command shares: one-line errors, output formats, and the Policy options."""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console

from binarize.errors import BinarizeError

__all__ = [
    "DEBUG_ENV",
    "OutputFormat",
    "console",
    "errors_as_one_line",
    "parse_input_size",
    "print_json",
    "stderr",
]

DEBUG_ENV = "BINARIZE_DEBUG"
"""Set this environment variable (to anything but 0) to see tracebacks instead of one-line errors."""

console = Console()
stderr = Console(stderr=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


FormatOption = Annotated[OutputFormat, typer.Option("--format", "-f", help="table (readable) or json (stdout only).")]


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def fail(message: str, code: int = 2) -> None:
    """Prints ``error: message`` on stderr and exits with ``code``."""
    sys.stderr.write(f"error: {message}\n")  # one write: lines of several processes do not interleave
    sys.stderr.flush()
    raise typer.Exit(code)


def errors_as_one_line(fn):
    """Turns errors into one line on stderr and a non-zero exit (a traceback with BINARIZE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BinarizeError as err:
            if _debug():
                raise
            fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, err.exit_code)
        except KeyboardInterrupt:
            if _debug():
                raise
            fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - the user sees one line; BINARIZE_DEBUG=1 shows the rest
            if _debug():
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            fail(f"unexpected {type(err).__name__}: {first} (set {DEBUG_ENV}=1 to see the traceback)", 1)

    return wrapper


def print_json(data: Any) -> None:
    """Writes ``data`` as JSON to stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise BinarizeError(f"--input-size takes C,H,W such as 3,224,224, got {text!r}")
    return size
