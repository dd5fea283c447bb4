"""``diagnose``: the dead-weight figures of every binary layer of a model, one typed record per layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from binarize.diagnostics.figures import binary_layers, weight_figures
from binarize.diagnostics.saturation import measure_saturation
from binarize.diagnostics.tracker import SignTracker
from binarize.errors import ConfigError

__all__ = ["RECORD_KEYS", "LayerDiagnostics", "Diagnosis", "diagnose"]

RECORD_KEYS = (
    "epoch",
    "layer",
    "clipped",
    "clipped_nominal",
    "flip_rate",
    "changed_from_start",
    "never_flipped",
    "saturation",
    "quant_error",
    "entropy",
    "weight_shape",
)
"""The keys of one line of ``diagnostics.jsonl``, in order."""


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
    """The figures of one binary layer (shares in [0, 1]); see :mod:`binarize.diagnostics`.

    Args:
        layer: Qualified module name.
        tau: The layer's ReCU quantile when measured.
        clipped: Share of latent weights with ``|W1| > Q(tau)`` (outside the ReCU clamp).
        clipped_nominal: ``2 (1 - tau)``, what ``clipped`` is for Laplace-shaped weights.
        flip_rate: Share of signs changed since the previous snapshot; None without a tracker or at
            the first snapshot.
        changed_from_start: Share of signs that differ from the first snapshot; None without a tracker.
        never_flipped: Share of signs never changed at any snapshot; None without a tracker.
        saturation: Share of pre-sign inputs with ``|A0| >= 1``; None without batches.
        quant_error: ``||W1 - a sign(W1)||^2 / ||W1||^2``, ``a_o = mean|W1_o|``.
        entropy: Mean over output channels of the binary entropy of the sign bits, in bits.
        weight_shape: ``std(W1) / mean|W1|`` (Laplace 1.41, Gaussian 1.25).
    """

    layer: str
    tau: float
    clipped: float
    clipped_nominal: float
    flip_rate: float | None
    changed_from_start: float | None
    never_flipped: float | None
    saturation: float | None
    quant_error: float
    entropy: float
    weight_shape: float

    def to_record(self, epoch: int | None) -> dict[str, Any]:
        """The JSON object of one ``diagnostics.jsonl`` line (the keys of :data:`RECORD_KEYS`)."""
        values = {"epoch": epoch, **dataclasses.asdict(self)}
        return {key: values[key] for key in RECORD_KEYS}


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The figures of every binary layer of a model, in module order."""

    layers: tuple[LayerDiagnostics, ...]

    def __iter__(self) -> Iterator[LayerDiagnostics]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: str | int) -> LayerDiagnostics:
        """The record of a layer by name, or by position."""
        if isinstance(key, int):
            return self.layers[key]
        for entry in self.layers:
            if entry.layer == key:
                return entry
        raise KeyError(key)

    def to_records(self, epoch: int | None) -> list[dict[str, Any]]:
        """One JSON object per layer, as written one per line to ``diagnostics.jsonl``.

        Args:
            epoch: The epoch the figures describe (0: the converted model, before training).
        """
        return [entry.to_record(epoch) for entry in self.layers]


def diagnose(
    model: nn.Module,
    batches: Iterable | None = None,
    *,
    tracker: SignTracker | None = None,
    max_batches: int = 4,
) -> Diagnosis:
    """Measures the dead-weight figures of every binary layer (``ReCUConv2d`` with binary weights).

    Runs outside the training step: a few extra passes over the weights and, with ``batches``, up to
    ``max_batches`` forward passes in eval mode without gradients. The model's state and the modes of
    its modules are left as they were. Call it once per epoch, after training the epoch and before
    tau moves on, so that ``clipped`` uses the tau the epoch trained with.

    Args:
        model: A converted model; DataParallel, DistributedDataParallel and ``torch.compile`` wrappers
            are unwrapped.
        batches: Input tensors, or ``(inputs, targets, ...)`` tuples, for the activation saturation
            (e.g. the validation loader); None leaves ``saturation`` None.
        tracker: A :class:`SignTracker`; each call with it takes one snapshot (``tracker.update``)
            and fills the flip figures, which stay None without it.
        max_batches: How many of ``batches`` to read.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        ConfigError: The model has no binary layer, or ``max_batches`` is below 1.

    Example::

        >>> tracker = SignTracker(binary)                  # right after binarize.convert
        >>> diagnosis = diagnose(binary, val_loader, tracker=tracker)
        >>> diagnosis["layer1.0.conv1"].clipped
        0.2994
    """
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ConfigError(f"max_batches: must be an integer >= 1, got {max_batches!r}")
    layers = binary_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no binary layer (ReCUConv2d with binary weights): diagnose a model from binarize.convert"
        )
    saturated = measure_saturation(model, batches, max_batches) if batches is not None else {}
    signs = tracker.update(model) if tracker is not None else {}
    entries = []
    for name, layer in layers:
        w = weight_figures(layer)
        s = signs.get(name)
        entries.append(
            LayerDiagnostics(
                layer=name,
                tau=w.tau,
                clipped=w.clipped,
                clipped_nominal=w.clipped_nominal,
                flip_rate=None if s is None else s.flip_rate,
                changed_from_start=None if s is None else s.changed_from_start,
                never_flipped=None if s is None else s.never_flipped,
                saturation=saturated.get(name),
                quant_error=w.quant_error,
                entropy=w.entropy,
                weight_shape=w.weight_shape,
            )
        )
    return Diagnosis(tuple(entries))
