"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events, ``curves.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_curves", "METRICS", "CURVES"]

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """One JSON object per epoch in ``metrics.jsonl``, mirrored to TensorBoard when it is installed.

    Args:
        run_dir: The run directory; None keeps the records in memory only.
        keep_until: On resume, drop records of epochs after this one (they were not checkpointed).
    """

    def __init__(self, run_dir: Path | None, keep_until: int | None = None) -> None:
        self.path = run_dir / METRICS if run_dir is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists() and keep_until is not None:
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("epoch", 0) <= keep_until:
                        self.records.append(record)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.writer = None
        if run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """Draws loss, top-1, learning rate and tau per epoch into ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], ("train_loss", "val_loss"), "loss"),
        (axes[0, 1], ("val_top1", "val_top5"), "accuracy (%)"),
        (axes[1, 0], ("lr",), "learning rate"),
        (axes[1, 1], ("tau",), "tau"),
    ]
    for ax, keys, label in panels:
        for key in keys:
            ax.plot(epochs, series(key), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
