"""Flags: rules over one layer's latest figures and its history, each with a name and a one-line meaning.

A rule reads records as :meth:`binarize.diagnostics.LayerDiagnostics.to_record` writes them (the
lines of ``diagnostics.jsonl``); a figure that is None never raises a flag. The thresholds are the
module's constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "Flag",
    "FLAGS",
    "layer_flags",
    "OVER_CLIPPED_RATIO",
    "FROZEN_FLIP_RATE",
    "SATURATED_SHARE",
    "OSCILLATING_FLIP_RATE",
    "OSCILLATING_NET",
    "STUCK_CHANGED",
    "STUCK_EPOCHS",
]

OVER_CLIPPED_RATIO = 1.25
"""``over-clipped``: clipped above this multiple of the nominal ``2 (1 - tau)``."""
FROZEN_FLIP_RATE = 1e-4
"""``frozen``: a flip rate below this (fewer than 1 sign in 10,000) in an epoch after the first."""
SATURATED_SHARE = 0.5
"""``saturated``: more than this share of the sign's inputs outside its gradient window."""
OSCILLATING_FLIP_RATE = 0.02
"""``oscillating``: more than this share of the signs changed in one epoch ..."""
OSCILLATING_NET = 0.25
"""... while the share that differs from the converted signs moved by less than this fraction of it."""
STUCK_CHANGED = 0.001
"""``stuck``: fewer than this share of signs differ from the converted ones ..."""
STUCK_EPOCHS = 3
"""... after at least this many epochs."""

Record = Mapping[str, Any]


def _over(value: Any, limit: float) -> bool:
    return value is not None and value > limit


def _under(value: Any, limit: float) -> bool:
    return value is not None and value < limit


@dataclasses.dataclass(frozen=True)
class Flag:
    """A rule over a layer's records.

    Args:
        name: Short name shown in the table.
        meaning: One line: what it means and what to try.
        check: ``check(latest, history)``: whether the latest record (the last of ``history``, the
            layer's records oldest first) raises the flag.
    """

    name: str
    meaning: str
    check: Callable[[Record, Sequence[Record]], bool] = dataclasses.field(repr=False, compare=False)


def _over_clipped(latest: Record, history: Sequence[Record]) -> bool:
    nominal = latest.get("clipped_nominal")
    return nominal is not None and _over(latest.get("clipped"), OVER_CLIPPED_RATIO * nominal)


def _frozen(latest: Record, history: Sequence[Record]) -> bool:
    epoch = latest.get("epoch")
    return epoch is not None and epoch >= 2 and _under(latest.get("flip_rate"), FROZEN_FLIP_RATE)


def _stuck(latest: Record, history: Sequence[Record]) -> bool:
    epoch = latest.get("epoch")
    return epoch is not None and epoch >= STUCK_EPOCHS and _under(latest.get("changed_from_start"), STUCK_CHANGED)


def _oscillating(latest: Record, history: Sequence[Record]) -> bool:
    """Many flips, little net change: most flips undo earlier ones (random flips would move the
    changed share by ``flip_rate * (1 - 2 changed)``, about half the flip rate)."""
    if len(history) < 2:
        return False
    flip, changed, before = (
        latest.get("flip_rate"),
        latest.get("changed_from_start"),
        history[-2].get("changed_from_start"),
    )
    if flip is None or changed is None or before is None or flip <= OSCILLATING_FLIP_RATE:
        return False
    return abs(changed - before) < OSCILLATING_NET * flip


def _pct(share: float) -> str:
    return f"{100 * share:g}%"


FLAGS: tuple[Flag, ...] = (
    Flag(
        "over-clipped",
        f"the clamp clips over {OVER_CLIPPED_RATIO:g}x its nominal 2(1-tau) of the latent weights, and those get no "
        "task gradient (the weights are not Laplace-shaped); try a higher tau_min",
        _over_clipped,
    ),
    Flag(
        "frozen",
        f"under {_pct(FROZEN_FLIP_RATE)} of the signs changed in the last epoch: the layer has stopped learning; "
        "raise the learning rate (its steps are small against its latent weights)",
        _frozen,
    ),
    Flag(
        "stuck",
        f"after {STUCK_EPOCHS} or more epochs under {_pct(STUCK_CHANGED)} of the signs differ from the converted "
        "model: the binary weights have not adapted; raise the learning rate",
        _stuck,
    ),
    Flag(
        "oscillating",
        f"over {_pct(OSCILLATING_FLIP_RATE)} of the signs changed in the last epoch, but the share that differs from "
        "the converted model barely moved: the flips undo each other; lower the learning rate",
        _oscillating,
    ),
    Flag(
        "saturated",
        f"over {_pct(SATURATED_SHARE)} of the sign's inputs lie outside its gradient window |A0| < 1 and get no "
        "gradient; check what feeds the layer (a ReLU?) or set thresholds from data (train.calibrate_thresholds)",
        lambda latest, history: _over(latest.get("saturation"), SATURATED_SHARE),
    ),
)
"""Every rule, in the order the table lists them."""


def layer_flags(history: Sequence[Record]) -> tuple[Flag, ...]:
    """The flags a layer's latest record raises, given its records oldest first."""
    if not history:
        return ()
    latest = history[-1]
    return tuple(flag for flag in FLAGS if flag.check(latest, history))
