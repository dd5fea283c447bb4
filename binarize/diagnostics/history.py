"""``diagnostics.jsonl``: one JSON object per binary layer and epoch; writing, trimming and reading it.

Each line is the record of :meth:`binarize.diagnostics.LayerDiagnostics.to_record`::

    {"epoch": 3, "layer": "layer1.0.conv1", "clipped": 0.31, "clipped_nominal": 0.27, "flip_rate": 0.012,
     "changed_from_start": 0.05, "never_flipped": 0.93, "saturation": 0.36, "quant_error": 0.41,
     "entropy": 0.998, "weight_shape": 1.37}

A figure that was not measured is ``null``. The reader tolerates a truncated last line (a run killed
while writing it); a record written again for the same layer and epoch (a resumed run) replaces the
earlier one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from binarize.diagnostics.diagnosis import RECORD_KEYS
from binarize.diagnostics.flags import Flag, layer_flags
from binarize.errors import FileFormatError
from binarize.files import atomic_write

__all__ = ["DIAGNOSTICS", "History", "append_records", "read_history", "trim_history"]

DIAGNOSTICS = "diagnostics.jsonl"
"""The file name in a run directory."""


def append_records(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends records to a ``diagnostics.jsonl`` file (created if absent), one line each, in one write."""
    text = "".join(json.dumps({key: record[key] for key in RECORD_KEYS}) + "\n" for record in records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def trim_history(path: str | Path, keep_until: int) -> None:
    """Drops the records of epochs after ``keep_until`` (on resume: those not in the checkpoint), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in _read_records(path) if r["epoch"] is None or r["epoch"] <= keep_until]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=True)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileFormatError(f"no such file: {path}")
    lines = path.read_text().split("\n")
    complete = lines[-1] == ""  # a file written to the end finishes with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not complete:
                break  # the last line was cut off while it was written
            raise FileFormatError(f"{path}, line {number}: not a JSON object; the file is corrupt") from None
        missing = [key for key in ("epoch", "layer") if not isinstance(record, dict) or key not in record]
        if missing:
            raise FileFormatError(f"{path}, line {number}: no '{missing[0]}' key; not a diagnostics record")
        records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class History:
    """The records of every layer, oldest first (in the order the layers first appear).

    Attributes:
        layers: Layer name -> its records, ordered by epoch.
    """

    layers: Mapping[str, tuple[dict[str, Any], ...]]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> History:
        """Groups records by layer; a later record for the same layer and epoch replaces an earlier one."""
        by_layer: dict[str, dict[Any, dict[str, Any]]] = {}
        for record in records:
            by_layer.setdefault(record["layer"], {})[record["epoch"]] = dict(record)
        return cls({name: tuple(_by_epoch(epochs.values())) for name, epochs in by_layer.items()})

    @property
    def epochs(self) -> list[int]:
        """The epochs present, in order."""
        return sorted({r["epoch"] for records in self.layers.values() for r in records if r["epoch"] is not None})

    def latest(self) -> list[dict[str, Any]]:
        """The last record of every layer."""
        return [records[-1] for records in self.layers.values() if records]

    def flags(self) -> dict[str, tuple[Flag, ...]]:
        """Layer name -> the flags its latest record and its history raise (see :mod:`binarize.diagnostics.flags`)."""
        return {name: layer_flags(records) for name, records in self.layers.items()}

    def summary(self) -> dict[str, Any]:
        """The latest figures with their flags, and the meaning of each flag raised (plain JSON types)."""
        flags = self.flags()
        raised = {f.name: f.meaning for fs in flags.values() for f in fs}
        layers = [{**record, "flags": [f.name for f in flags[record["layer"]]]} for record in self.latest()]
        return {"epochs": self.epochs, "layers": layers, "flags": raised}


def _by_epoch(records: Iterable[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    return sorted(records, key=lambda r: -1 if r["epoch"] is None else r["epoch"])


def read_history(path: str | Path) -> History:
    """Reads ``diagnostics.jsonl`` (a file, or the run directory holding it) into a :class:`History`.

    Raises:
        FileFormatError: The file is missing, or a line other than a cut-off last one is not a record.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSTICS
    return History.from_records(_read_records(path))
