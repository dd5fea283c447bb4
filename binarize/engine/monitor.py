"""The dead-weight diagnostics of a run: ``diagnostics.jsonl`` after conversion and after every epoch.

Between epochs, never inside a training step, the main process measures every binary layer
(:func:`binarize.diagnostics.diagnose`: a few passes over the weights and ``train.diagnostics_batches``
validation batches) at the tau the epoch trained with, and appends one record per layer. The sign
tracker (converted signs, last epoch's, never flipped) goes into the checkpoint, so a resumed run
continues the file exactly; at the end ``diagnostics.png`` and ``weights.png`` are drawn when
matplotlib is installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from binarize.diagnostics import (
    DIAGNOSTICS,
    SignTracker,
    append_records,
    binary_layers,
    diagnose,
    read_history,
    trim_history,
)
from binarize.recipes import TrainConfig

__all__ = ["DIAGNOSTICS_PNG", "WEIGHTS_PNG", "RunMonitor"]

DIAGNOSTICS_PNG = "diagnostics.png"
WEIGHTS_PNG = "weights.png"


class RunMonitor:
    """Writes a run's diagnostics; only the main process measures and writes.

    Args:
        train: The run's execution settings (``diagnostics``, ``diagnostics_batches``).
        run_dir: The run directory, or None for a run without files.
        is_main: Whether this process is the main one.
    """

    def __init__(self, train: TrainConfig, run_dir: Path | None, is_main: bool) -> None:
        self.enabled = train.diagnostics and is_main
        self.batches = train.diagnostics_batches
        self.path = None if run_dir is None else run_dir / DIAGNOSTICS
        self.tracker: SignTracker | None = None

    def start_stage(self, model: nn.Module) -> None:
        """Takes the signs a stage with binary weights starts from, when none are tracked yet (the second
        stage of two-stage training)."""
        if self.enabled and self.tracker is None and binary_layers(model):
            self.tracker = SignTracker(model)

    def record(self, model: nn.Module, val_batches: Iterable, epoch: int) -> None:
        """Measures every binary layer and appends the records of ``epoch`` (epoch 0 starts the file afresh).

        Nothing happens when diagnostics are off, on other processes, or when no layer has binary
        weights (the first stage of two-stage training).
        """
        if not (self.enabled and binary_layers(model)):
            return
        if self.tracker is None:
            self.tracker = SignTracker()
        batches = val_batches if self.batches else None
        diagnosis = diagnose(model, batches, tracker=self.tracker, max_batches=max(self.batches, 1))
        if self.path is not None:
            if epoch == 0:
                self.path.unlink(missing_ok=True)
            append_records(self.path, diagnosis.to_records(epoch))

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries: the sign tracker's state (None before any binary layer was tracked)."""
        return {"sign_tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def restore(self, state: dict[str, Any], epoch: int) -> None:
        """Continues from a checkpoint of ``epoch`` (global): the tracker, and the file cut to that epoch."""
        if state.get("sign_tracker") is not None:
            self.tracker = SignTracker()
            self.tracker.load_state_dict(state["sign_tracker"])
        if self.enabled and self.path is not None:
            trim_history(self.path, keep_until=epoch)

    def plot(self, model: nn.Module) -> None:
        """``diagnostics.png`` (clipped share and flip rate per layer over the epochs) and ``weights.png``
        (the latent weight histograms with the clamp bounds), when matplotlib is installed."""
        from binarize.diagnostics.plots import plot_history, plot_weight_histograms, plots_available

        if not (self.enabled and self.path is not None and self.path.exists() and binary_layers(model)):
            return
        if plots_available():
            plot_history(read_history(self.path), self.path.with_name(DIAGNOSTICS_PNG))
            plot_weight_histograms(model, self.path.with_name(WEIGHTS_PNG))
