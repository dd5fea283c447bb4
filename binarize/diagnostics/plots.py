"""Plots of the diagnostics, as PNG files: the latent-weight histograms and the per-layer curves.

matplotlib is optional (``pip install 'binarize[plots]'``) and imported only here, inside the
functions. Every figure is an explicit ``matplotlib.figure.Figure`` on the Agg canvas: no pyplot
state, no ``matplotlib.use``, so plotting is safe beside a user's own matplotlib session.

* :func:`plot_weight_histograms`: per binary layer, the histogram of ``W1`` (the standardised centred
  latent weights) with the ReCU clamp bounds ``+-Q(tau)``, the region they clip, the Laplace density
  the threshold assumes, and the clipped share (the paper's figure of the dead weights);
* :func:`plot_history`: per binary layer, the clipped share with its nominal ``2 (1 - tau)`` and the
  flip rate over the epochs of ``diagnostics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binarize.diagnostics.figures import binary_layers, standardized_weights
from binarize.diagnostics.history import History
from binarize.errors import BinarizeError, ConfigError

__all__ = [
    "plots_available",
    "weight_histogram_figure",
    "plot_weight_histograms",
    "history_figure",
    "plot_history",
]

_PANEL = (2.7, 2.1)  # inches per panel
_CLIP_COLOUR = "#d62728"
_WEIGHT_COLOUR = "#1f77b4"
_FLIP_COLOUR = "#2ca02c"
_FLOOR = 1e-4  # the bottom of the log axis of the curves: 0.01 %


def plots_available() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(panels: int, columns: int) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BinarizeError("the plots need matplotlib: pip install 'binarize[plots]'") from None
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ConfigError(f"columns: must be an integer >= 1, got {columns!r}")
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(_PANEL[0] * columns, _PANEL[1] * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, columns, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _label_outer(axes: list[Any], columns: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the bottom panel of each column and on the first panel of each row only."""
    columns = min(columns, len(axes))
    for i, ax in enumerate(axes):
        if i % columns == 0:
            ax.set_ylabel(ylabel)
        if i + columns >= len(axes):
            ax.set_xlabel(xlabel)


@torch.no_grad()
def weight_histogram_figure(model: nn.Module, *, columns: int = 6, bins: int = 61, title: str | None = None) -> Any:
    """The histograms of ``W1`` of every binary layer, one panel each, as a matplotlib ``Figure``.

    Args:
        model: A converted model (wrappers are unwrapped).
        columns: Panels per row.
        bins: Histogram bins per panel.
        title: The figure's title; by default it names the tau of the layers.
    """
    layers = binary_layers(model)
    if not layers:
        raise ConfigError("the model has no binary layer (ReCUConv2d with binary weights): nothing to plot")
    fig, axes = _figure(len(layers), columns)
    taus = set()
    for ax, (name, layer) in zip(axes, layers, strict=True):
        w1, threshold = standardized_weights(layer)
        values = w1.flatten()
        q = float(threshold)
        laplace_b = float(values.abs().mean())
        clipped = float((values.abs() > threshold).to(torch.float64).mean())
        tau = float(layer.tau)
        taus.add(round(tau, 4))
        limit = max(float(values.abs().max()), min(q, 1e6)) * 1.05
        counts = torch.histc(values, bins=bins, min=-limit, max=limit)
        width = 2 * limit / bins
        edges = torch.linspace(-limit, limit, bins + 1, dtype=torch.float64)
        density = (counts / (values.numel() * width)).cpu().numpy()
        ax.stairs(density, edges.numpy(), fill=True, color=_WEIGHT_COLOUR, alpha=0.55, label="W1 (histogram)")
        grid = torch.linspace(-limit, limit, 201, dtype=torch.float64)
        laplace = torch.exp(-grid.abs() / laplace_b) / (2 * laplace_b)
        ax.plot(grid.numpy(), laplace.numpy(), color="0.25", lw=1.0, ls=":", label="Laplace(0, b), b = mean|W1|")
        if math.isfinite(q):
            for side in (-1, 1):
                ax.axvspan(side * q, side * limit, color=_CLIP_COLOUR, alpha=0.08, lw=0)
                ax.axvline(side * q, color=_CLIP_COLOUR, lw=1.2, ls="--")
            ax.plot([], [], color=_CLIP_COLOUR, lw=1.2, ls="--", label="clamp bounds ±Q(τ)")
        nominal = 2 * (1 - tau)
        ax.text(
            0.03,
            0.96,
            f"clipped {100 * clipped:.1f}%\nnominal {100 * nominal:.1f}%",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7.5,
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
        )
        ax.set_title(f"{name}  (Q = {q:.2f})", fontsize=8.5)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(0, max(float(density.max()), float(laplace.max())) * 1.3)
        ax.tick_params(labelsize=7)
    _label_outer(axes, columns, "W1 (standardised latent weight)", "density")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    if title is None:
        tau_text = f"tau = {taus.pop():.4f}" if len(taus) == 1 else "tau per layer"
        title = f"Latent weights of the binary layers ({tau_text}): the shaded tails get no task gradient"
    fig.suptitle(title, fontsize=10)
    return fig


def plot_weight_histograms(model: nn.Module, path: str | Path, **kwargs: Any) -> Path:
    """Writes :func:`weight_histogram_figure` as a PNG; returns the path."""
    return _save(weight_histogram_figure(model, **kwargs), path)


def _series(records: tuple[dict[str, Any], ...], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r.get(key)) for r in records if r["epoch"] is not None and r.get(key) is not None]
    return [p[0] for p in points], [max(p[1], _FLOOR) for p in points]


def history_figure(history: History, *, columns: int = 6, title: str | None = None) -> Any:
    """The clipped share (with its nominal) and the flip rate of every layer over the epochs, as a ``Figure``.

    The shares are drawn on a log axis in percent, so that a 30 % clipped share and a 0.5 % flip rate
    both read; a share of 0 is drawn at the axis floor, 0.01 %.
    """
    names = [name for name, records in history.layers.items() if records]
    if not names:
        raise ConfigError("the history holds no records: nothing to plot")
    fig, axes = _figure(len(names), columns)
    from matplotlib.ticker import FuncFormatter  # after _figure, which says how to install matplotlib

    epochs = history.epochs
    for ax, name in zip(axes, names, strict=True):
        records = history.layers[name]
        for key, colour, style, marker, label in (
            ("clipped", _CLIP_COLOUR, "-", "o", "clipped (outside the clamp)"),
            ("clipped_nominal", _CLIP_COLOUR, "--", None, "nominal 2(1 − τ)"),
            ("flip_rate", _FLIP_COLOUR, "-", "s", "flip rate (since the previous epoch)"),
        ):
            x, y = _series(records, key)
            ax.plot(x, y, color=colour, ls=style, marker=marker, ms=3.5, lw=1.3, label=label)
        ax.set_yscale("log")
        ax.set_ylim(_FLOOR * 0.8, 1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
        if epochs:
            ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
            ax.set_xticks(epochs if len(epochs) <= 12 else epochs[:: math.ceil(len(epochs) / 12)])
        ax.grid(alpha=0.3, which="major")
        ax.set_title(name, fontsize=8.5)
        ax.tick_params(labelsize=7)
    _label_outer(axes, columns, "epoch", "share of weights")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title or "Clipped share and sign flips per binary layer", fontsize=10)
    return fig


def plot_history(history: History, path: str | Path, **kwargs: Any) -> Path:
    """Writes :func:`history_figure` as a PNG; returns the path."""
    return _save(history_figure(history, **kwargs), path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
