"""``binarize diagnose``: the dead-weight diagnostics of a run directory or of a saved binary model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import binarize
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, print_json, stderr
from binarize.diagnostics import DIAGNOSTICS, History, diagnose, read_history
from binarize.diagnostics.table import render_table
from binarize.engine import LAST
from binarize.errors import BinarizeError, FileFormatError

__all__ = ["diagnose_command"]

HISTORY_PNG = "diagnostics.png"
WEIGHTS_PNG = "weights.png"


def _model_file(file: Path, data: Path | None, batches: int, batch_size: int, workers: int, device: str):
    """Diagnoses the model in ``file`` itself: no history, so no flip figures."""
    target = binarize.engine.DistContext().device(device)
    model = binarize.load(file, device=target)
    run = binarize.run_record(model)
    metrics = run.metrics if run is not None else {}
    loader = None
    if data is not None:
        loader = binarize.engine.eval_loader(model, data, batch_size=batch_size, workers=workers, device=target)
    try:
        diagnosis = diagnose(model, loader, max_batches=batches)
    finally:
        if loader is not None:
            loader.close()
    return History.from_records(diagnosis.to_records(metrics.get("epoch"))), model


@errors_as_one_line
def diagnose_command(
    target: Annotated[
        Path,
        typer.Argument(help=f"A run directory (its {DIAGNOSTICS} and {LAST}) or a .safetensors model file."),
    ],
    output_format: FormatOption = OutputFormat.table,
    plots: Annotated[
        Path | None,
        typer.Option(help=f"Write {HISTORY_PNG} (a run's curves) and {WEIGHTS_PNG} (weight histograms) here."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Model file only: a dataset whose val/ (or test/) images measure the activation saturation."),
    ] = None,
    batches: Annotated[int, typer.Option(help="Batches of --data to read.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per batch of --data.")] = 64,
    workers: Annotated[int, typer.Option(help="Loader worker processes for --data.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (model file only).")] = "auto",
) -> None:
    """Show how the binary layers are doing inside: dead (clipped) weights, sign flips, saturation, flags.

    For a run directory the figures are the latest of its diagnostics.jsonl, with the flags their
    history raises; for a model file they are measured on the model (no flip figures without a run).
    """
    model = None
    if target.is_dir():
        if not (target / DIAGNOSTICS).is_file():
            raise BinarizeError(f"{target} holds no {DIAGNOSTICS}: pass a run directory written by binarize finetune")
        if data is not None:
            raise BinarizeError("--data measures a model file; a run directory already holds its saturation figures")
        history = read_history(target)
    elif target.is_file():
        if batches < 1 or batch_size < 1:
            raise BinarizeError("--batches and --batch-size must be >= 1")
        history, model = _model_file(target, data, batches, batch_size, workers, device)
    else:
        raise BinarizeError(f"no such file or directory: {target}")
    if output_format is OutputFormat.json:
        print_json(history.summary())
    else:
        render_table(history, console, title=f"{target.name}: diagnostics")
    if plots is not None:
        _write_plots(target, history, model, plots)


def _write_plots(target: Path, history: History, model, folder: Path) -> None:
    from binarize.diagnostics.plots import plot_history, plot_weight_histograms

    written = []
    if target.is_dir():
        written.append(plot_history(history, folder / HISTORY_PNG))
        if (target / LAST).is_file():
            try:
                model = binarize.load(target / LAST)
            except FileFormatError as err:  # a model built by user code cannot be rebuilt from the file alone
                stderr.print(f"no {WEIGHTS_PNG}: {err}", soft_wrap=True, markup=False)
    if model is not None:
        written.append(plot_weight_histograms(model, folder / WEIGHTS_PNG))
    for path in written:
        stderr.print(f"wrote {path}", soft_wrap=True, markup=False)
