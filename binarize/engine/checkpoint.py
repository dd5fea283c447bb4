"""Checkpoints of a run: the model as a binarize file, the training state beside it.

A run directory holds ``last.safetensors`` and ``best.safetensors`` (the format of
:func:`binarize.save`, so ``binarize eval`` / ``inspect`` / :func:`binarize.load` take them) and
``state.pt``: optimizer, gradient scaler, progress, best metric and RNG states, plain tensors and
containers only, read back with ``torch.load(weights_only=True)``. Every file is written to a
temporary name and renamed into place, so an interruption never leaves a half-written checkpoint,
and Ctrl-C is held back while a checkpoint's files are written (:func:`interrupts_deferred`), so
``last.safetensors`` and ``state.pt`` always describe the same epoch.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from binarize.errors import TrainingError
from binarize.files import atomic_write

__all__ = [
    "LAST",
    "BEST",
    "INTERRUPTED",
    "STATE",
    "rng_state",
    "restore_rng_state",
    "save_state",
    "load_state",
    "interrupts_deferred",
]

LAST = "last.safetensors"
BEST = "best.safetensors"
INTERRUPTED = "interrupted.safetensors"
STATE = "state.pt"
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA) and Python random states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Writes ``state.pt`` atomically."""
    atomic_write(run_dir / STATE, lambda tmp: torch.save({"version": STATE_VERSION, **state}, tmp), force=True)


def load_state(run_dir: Path) -> dict[str, Any]:
    """Reads ``state.pt`` (tensors and plain containers only)."""
    path = run_dir / STATE
    if not path.is_file():
        raise TrainingError(f"nothing to resume in {run_dir}: no {STATE}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(
            f"{path} is unreadable ({type(err).__name__}); start a new run in another --output"
        ) from err
    if state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} has state version {state.get('version')}; this binarize reads {STATE_VERSION}")
    return state


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block has run, then raises ``KeyboardInterrupt``.

    Only in the main thread with Python's own SIGINT handler installed; elsewhere the block runs as is.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if received:
        raise KeyboardInterrupt
