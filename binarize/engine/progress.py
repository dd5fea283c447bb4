"""Progress of a run: rich progress bars on the main process, nothing elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["Reporter", "RichReporter"]


class Reporter:
    """Receives the run's events; this base class ignores them (non-main processes, quiet runs)."""

    def message(self, text: str) -> None:
        """A line for the user."""

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, stage: str) -> None:
        """An epoch begins."""

    def step(self, done: int, loss: float, images_per_s: float) -> None:
        """Steps done in this epoch, the running loss and throughput (called every ``log_every`` steps)."""

    def end_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's metrics."""

    def close(self) -> None:
        """The run is over."""


class RichReporter(Reporter):
    """Epoch and step progress bars with loss, images/s and ETA, plus one summary line per epoch.

    Args:
        console: Where to draw; standard error by default.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = None

    def message(self, text: str) -> None:
        self.console.print(text)

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, stage: str) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("", total=steps, info="")
        self.progress.reset(self.task, total=steps, description=f"{stage} epoch {epoch}/{total_epochs}", info="")

    def step(self, done: int, loss: float, images_per_s: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.4f}  {images_per_s:,.0f} img/s")

    def end_epoch(self, record: dict[str, Any]) -> None:
        parts = [f"epoch {record['epoch']}"]
        for key, fmt in (("tau", "{:.4f}"), ("lr", "{:.2e}"), ("train_loss", "{:.4f}"), ("val_loss", "{:.4f}")):
            if record.get(key) is not None:
                parts.append(f"{key} " + fmt.format(record[key]))
        for key in ("val_top1", "val_top5"):
            if record.get(key) is not None:
                parts.append(f"{key} {record[key]:.2f}%")
        if record.get("images_per_s"):
            parts.append(f"{record['images_per_s']:,.0f} img/s")
        self.console.print("  ".join(parts))

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None
