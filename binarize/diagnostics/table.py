"""The diagnostics as a rich table: one row per binary layer with its latest figures and flags, then the legend.

rich is imported inside :func:`render_table` only, so importing binarize does not import it.
"""

from __future__ import annotations

from typing import Any

from binarize.diagnostics.diagnosis import Diagnosis
from binarize.diagnostics.flags import FLAGS
from binarize.diagnostics.history import History

__all__ = ["render_table"]

_COLUMNS = ("clip%", "nom%", "flip%", "chg%", "never%", "sat%", "QE", "H", "shape")
_KEY = (
    "clip: latent weights outside the ReCU clamp (no task gradient); nom: its nominal 2(1-tau); "
    "flip: signs changed since the previous epoch; chg: signs that differ from the converted model; "
    "never: signs never flipped; sat: sign inputs outside the gradient window |A0| < 1; "
    "QE: normalised quantization error; H: entropy of the sign bits; shape: std/mean|W1| (Laplace 1.41, Gaussian 1.25)"
)


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(diagnostics: History | Diagnosis, console: Any = None, *, title: str = "diagnostics") -> None:
    """Prints the latest figures of every layer, its flags, and one legend line per flag raised.

    Args:
        diagnostics: A :class:`History` (e.g. from :func:`read_history`), or a :class:`Diagnosis`
            (no history: the rules that need one do not fire).
        console: A ``rich.console.Console``; a new one on stdout by default.
        title: The table's title.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    history = History.from_records(diagnostics.to_records(None)) if isinstance(diagnostics, Diagnosis) else diagnostics
    console = console or Console()
    flags = history.flags()
    latest = history.latest()
    epochs = sorted({r["epoch"] for r in latest if r["epoch"] is not None})
    if epochs:
        title += f", epoch {epochs[-1]}" if len(epochs) == 1 else f", epochs {epochs[0]}-{epochs[-1]}"
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
    table.add_column("layer", overflow="fold")
    for name in _COLUMNS:  # the figures never wrap
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    table.add_column("flags", min_width=12)
    for r in latest:
        raised = flags[r["layer"]]
        table.add_row(
            r["layer"],
            _percent(r["clipped"]),
            _percent(r["clipped_nominal"]),
            _percent(r["flip_rate"], 2),
            _percent(r["changed_from_start"]),
            _percent(r["never_flipped"]),
            _percent(r["saturation"]),
            _number(r["quant_error"], 3),
            _number(r["entropy"], 3),
            _number(r["weight_shape"], 2),
            "\n".join(f.name for f in raised),
            style="yellow" if raised else None,
        )
    console.print(table)
    console.print(Text(_KEY, style="dim"))
    names = {f.name for fs in flags.values() for f in fs}
    if not names:
        console.print("no flags raised")
    for flag in FLAGS:
        if flag.name in names:
            line = Text()
            line.append(flag.name, style="bold yellow")
            line.append(f": {flag.meaning}")
            console.print(line)
