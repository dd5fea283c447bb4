"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events, ``curves.png``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from binarize.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MetricsLog", "curves_figure", "plot_curves", "METRICS", "CURVES"]

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """One JSON object per epoch in ``metrics.jsonl``, mirrored to TensorBoard when it is installed.

    Nothing is written before the first :meth:`append` (the TensorBoard writer, which creates its
    folder, is opened then too), so a run that fails before its first record leaves no files.

    Args:
        run_dir: The run directory; None keeps the records in memory only.
        keep_until: On resume, drop records of epochs after this one (they were not checkpointed).
    """

    def __init__(self, run_dir: Path | None, keep_until: int | None = None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / METRICS if run_dir is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists() and keep_until is not None:
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("epoch", 0) <= keep_until:
                        self.records.append(record)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.writer: Any = None
        self._writer_tried = False

    def _tensorboard(self) -> Any:
        if not self._writer_tried and self.run_dir is not None:
            self._writer_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.writer = None
        return self.writer

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    writer.add_scalar(key, value, record["epoch"])
            writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def curves_figure(
    records: Sequence[dict[str, Any]],
    lr_curve: Sequence[tuple[float, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """Loss, accuracy, learning rate and tau of a run as a matplotlib ``Figure`` (no pyplot, no backend switch).

    Args:
        records: The metrics records, one per epoch (epoch 0: the converted model).
        lr_curve: ``(epoch, learning rate)`` at every optimizer step (:func:`~binarize.engine.schedules.lr_curve`);
            without it the learning rate is drawn at epoch ends only.
        title: The figure's title.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:
        return [r.get(key) if r.get(key) is not None else math.nan for r in records]

    fig = Figure(figsize=(10, 7), dpi=100)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], ("train_loss", "val_loss"), "loss"),
        (axes[0, 1], ("val_top1", "val_top5"), "accuracy (%)"),
        (axes[1, 0], ("lr",), "learning rate"),
        (axes[1, 1], ("tau",), "tau"),
    ]
    for ax, keys, label in panels:
        if keys == ("lr",) and lr_curve:
            ax.plot([x for x, _ in lr_curve], [y for _, y in lr_curve], label="lr (per step)")
        else:
            for key in keys:
                ax.plot(epochs, series(key), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: Path,
    *,
    lr_curve: Sequence[tuple[float, float]] | None = None,
    title: str | None = None,
) -> bool:
    """Draws :func:`curves_figure` into ``path`` with matplotlib's Agg canvas; False without matplotlib.

    The figure is drawn on its own canvas: the process's matplotlib backend and pyplot state are
    left alone. The file is written atomically.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return False
    canvas = FigureCanvasAgg(curves_figure(records, lr_curve, title))
    atomic_write(path, lambda tmp: canvas.print_png(str(tmp)), force=True)
    return True
