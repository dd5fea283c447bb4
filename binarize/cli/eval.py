"""``binarize eval``: accuracy and loss of a saved model on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import binarize
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, print_json
from binarize.data import DataConfig, Loader, build_datasets, resolve_data_config
from binarize.engine.loop import autocast_dtype
from binarize.files import run_record

__all__ = ["eval_command"]


@errors_as_one_line
def eval_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors model written by binarize.")],
    data: Annotated[Path, typer.Option(help="Dataset directory; its val/ (or test/) split is used.")],
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    workers: Annotated[int, typer.Option(help="Loader worker processes.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    output_format: FormatOption = OutputFormat.table,
) -> None:
    """Evaluate a saved model: top-1, top-5 and loss on the validation split.

    The images are prepared exactly as in the run that wrote the file (its recorded data settings),
    else from the model's defaults.
    """
    ctx = binarize.engine.DistContext()
    target = ctx.device(device)
    model = binarize.load(file, device=target)
    run = run_record(model)
    cfg = DataConfig(workers=workers)
    resolved = run.data if run is not None and run.data is not None else resolve_data_config(cfg, model)
    datasets = build_datasets(cfg, data, resolved)
    if run is not None and run.classes and list(run.classes) != list(datasets.classes):
        raise binarize.BinarizeError(
            f"the class folders of {data} differ from those the model was trained on ({len(run.classes)} classes)"
        )
    if batch_size < 1:
        raise binarize.BinarizeError(f"--batch-size must be >= 1, got {batch_size}")
    # Only the validation split is read: a plain loader, not the train loader's batch-size checks.
    loader = Loader(datasets.val, batch_size=batch_size, num_workers=workers, pin_memory=target.type == "cuda")
    try:
        metrics = binarize.evaluate(model, loader, target, autocast_dtype("fp32", target))
    finally:
        loader.close()
    if output_format is OutputFormat.json:
        print_json(metrics)
        return
    table = Table(title=f"{file.name} on {data}")
    for column in ("top-1", "top-5", "loss", "images"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{metrics['top1']:.2f}%", f"{metrics['top5']:.2f}%", f"{metrics['loss']:.4f}", str(metrics["images"])
    )
    console.print(table)
