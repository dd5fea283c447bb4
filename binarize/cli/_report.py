"""Rendering a :class:`binarize.Report` as rich tables."""

from __future__ import annotations

from rich.table import Table

import binarize

__all__ = ["render_report"]


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render_report(
    report: binarize.Report, console, title: str = "binarize", extra_rows: tuple[tuple[str, str], ...] = ()
) -> None:
    """Prints the layer table and the summary (with ``extra_rows`` at its end)."""
    layers = Table(title=f"{title}: layers", header_style="bold")
    for column in ("layer", "op", "weight shape", "decision", "reason", "MACs"):
        layers.add_column(column, justify="right" if column == "MACs" else "left", overflow="fold")
    for e in report.layers:
        style = "green" if e.decision == "binary" else None
        layers.add_row(e.name, e.op, "x".join(map(str, e.shape)), e.decision, e.reason, _count(e.macs), style=style)
    console.print(layers)
    s = report.summary.to_dict()
    summary = Table(title=f"{title}: summary", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    rows = [
        ("binary convs", str(s["binary_convs"])),
        ("float convs / linears", f"{s['float_convs']} / {s['float_linears']}"),
        ("binary share of MACs", f"{100 * s['binary_mac_fraction']:.1f}%"),
        ("parameters", _count(s["params"])),
        ("size fp32 -> packed", f"{_size(s['fp32_bytes'])} -> {_size(s['packed_bytes'])}"),
        ("BOPs / FLOPs / OPs", f"{_count(s['bops'])} / {_count(s['flops'])} / {_count(s['ops'])}"),
        ("input size", "x".join(map(str, s["input_size"]))),
        ("traced", {True: "yes", False: "no (converted by module name)", None: "not converted"}[s["traced"]]),
        ("activations replaced / shortcuts added", f"{s['activations_replaced']} / {s['shortcuts_added']}"),
    ]
    if s.get("trace_error"):
        rows.append(("trace error", s["trace_error"]))
    for warning in s.get("warnings", ()):
        rows.append(("warning", warning))
    rows.extend(extra_rows)
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
