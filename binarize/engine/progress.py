"""Progress of a run: rich progress bars on a terminal, plain unwrapped log lines elsewhere, nothing off rank 0.

:func:`default_reporter` decides from the stream it is given: a terminal gets a :class:`RichReporter`
(bars, redrawn in place), anything else (a file, a pipe, CI logs) a :class:`PlainReporter`, whose
lines are never wrapped or split and which prints a progress line during an epoch every
``interval`` seconds. rich is imported only when a :class:`RichReporter` is built.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Reporter", "PlainReporter", "RichReporter", "default_reporter", "epoch_line"]


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


def epoch_line(record: dict[str, Any]) -> str:
    """The one-line summary of an epoch's metrics record."""
    parts = [f"epoch {record['epoch']}"]
    for key, fmt in (("tau", "{:.4f}"), ("lr", "{:.2e}"), ("train_loss", "{:.4f}"), ("val_loss", "{:.4f}")):
        if record.get(key) is not None:
            parts.append(f"{key} " + fmt.format(record[key]))
    for key in ("val_top1", "val_top5"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.2f}%")
    if record.get("val_images") is not None:
        parts.append(f"val_images {record['val_images']}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:,.0f} img/s")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class PlainReporter(Reporter):
    """Plain lines for logs: one write per line, never wrapped, flushed at once.

    Besides messages and one summary line per epoch, it prints a progress line during an epoch
    (``<stage> epoch e/E  step i/n  loss ...  N img/s  elapsed h:mm:ss``) when ``interval`` seconds
    have passed since the last line, or ``every_steps`` steps.

    Args:
        stream: Where to write (a text stream: a file, a pipe, ``sys.stderr``).
        interval: Seconds between progress lines within an epoch.
        every_steps: Also print a progress line every this many steps (None: by time only).
        clock: The time source (seconds; for tests).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 30.0,
        every_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.interval, self.every_steps, self.clock = stream, interval, every_steps, clock
        self._epoch = ""
        self._steps = 0
        self._start = self._last_time = 0.0
        self._last_step = 0

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self._write(text)

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, stage: str) -> None:
        self._epoch, self._steps = f"{stage} epoch {epoch}/{total_epochs}", steps
        self._start = self._last_time = self.clock()
        self._last_step = 0

    def step(self, done: int, loss: float, images_per_s: float) -> None:
        now = self.clock()
        due = now - self._last_time >= self.interval
        if self.every_steps is not None and done - self._last_step >= self.every_steps:
            due = True
        if not due or done >= self._steps:  # the epoch's summary line follows at once
            return
        self._last_time, self._last_step = now, done
        self._write(
            f"{self._epoch}  step {done}/{self._steps}  loss {loss:.4f}  {images_per_s:,.0f} img/s  "
            f"elapsed {_clock(now - self._start)}"
        )

    def end_epoch(self, record: dict[str, Any]) -> None:
        self._write(epoch_line(record))


class RichReporter(Reporter):
    """Epoch and step progress bars with loss, images/s and ETA, plus one summary line per epoch.

    Args:
        console: A rich ``Console`` to draw on; by default one on ``stream``.
        stream: The stream of the default console; standard error when None.
    """

    def __init__(self, console: Console | None = None, *, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if console is None:
            console = Console(stderr=True) if stream is None else Console(file=stream)
        self.console = console
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
        self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, stage: str) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("", total=steps, info="")
        self.progress.reset(self.task, total=steps, description=f"{stage} epoch {epoch}/{total_epochs}", info="")

    def step(self, done: int, loss: float, images_per_s: float) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.4f}  {images_per_s:,.0f} img/s")

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.console.print(epoch_line(record), soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def default_reporter(stream: TextIO | None = None) -> Reporter:
    """The reporter for ``stream`` (standard error when None): rich bars on a terminal, plain lines elsewhere."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return RichReporter(stream=stream)
    return PlainReporter(stream)
