"""Sign flips of the binary weights between snapshots (once per epoch), resumable.

For each binary layer the tracker keeps three bit masks, packed 8 weights to a byte: the signs at
the first snapshot (the converted, pretrained signs), the signs at the previous snapshot, and which
weights never changed sign between any two snapshots. From them (AdamBNN's FF and C2I ratios, the
"silent" weights of OvSW):

* ``flip_rate``: share of signs that changed since the previous snapshot;
* ``changed_from_start``: share whose sign differs from the first snapshot;
* ``never_flipped``: share that never changed sign at any snapshot since the first.

The signs are those the layer deploys, :meth:`binarize.nn.ReCUConv2d.sign_bits`. A layer is tracked
from the first snapshot at which its weights are binary (for two-stage training: the start of the
binary-weight stage).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from binarize.diagnostics.figures import binary_layers
from binarize.errors import TrainingError

__all__ = ["SignFigures", "SignTracker"]

STATE_VERSION = 1
_MASKS = ("start", "previous", "never_flipped")


@dataclasses.dataclass(frozen=True)
class SignFigures:
    """The sign figures of one layer at one snapshot; ``flip_rate`` is None at the layer's first snapshot."""

    flip_rate: float | None
    changed_from_start: float
    never_flipped: float


def _pack(bits: Tensor) -> Tensor:
    """A flat bool tensor as uint8, 8 bits a byte (the first bit the highest), zero-padded."""
    pad = (-bits.numel()) % 8
    padded = torch.cat([bits, bits.new_zeros(pad)]) if pad else bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (padded.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`_pack`."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).flatten()[:numel].bool()


class SignTracker:
    """Snapshots of the binary weights' signs, one per :meth:`update` (once per epoch).

    Args:
        model: Take the first snapshot of this model now (right after conversion); else the first
            :meth:`update` takes it.

    Example::

        >>> tracker = SignTracker(binary_model)      # the converted signs
        >>> # ... one epoch of training ...
        >>> tracker.update(binary_model)["layer1.0.conv1"].flip_rate
        0.0123
        >>> state = tracker.state_dict()             # into the checkpoint; load_state_dict() on resume
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._layers: dict[str, dict[str, Any]] = {}
        self.snapshots = 0
        if model is not None:
            self.update(model)

    @property
    def layers(self) -> list[str]:
        """Names of the tracked layers."""
        return list(self._layers)

    @torch.no_grad()
    def update(self, model: nn.Module) -> dict[str, SignFigures]:
        """Takes a snapshot of every binary layer's signs and compares it with the previous one.

        Returns:
            Layer name -> :class:`SignFigures`, for the binary layers of ``model``.
        """
        figures: dict[str, SignFigures] = {}
        pending: dict[str, Tensor] = {}
        for name, layer in binary_layers(model):
            bits = layer.sign_bits().flatten()
            track = self._layers.get(name)
            if track is None:
                packed = _pack(bits)
                self._layers[name] = {"numel": bits.numel(), "start": packed, "previous": packed}
                self._layers[name]["never_flipped"] = _pack(torch.ones_like(bits))
                figures[name] = SignFigures(None, 0.0, 1.0)
                continue
            if track["numel"] != bits.numel():
                raise TrainingError(
                    f"layer '{name}' has {bits.numel()} weights but the sign tracker holds {track['numel']}; "
                    "use a new SignTracker for a different model"
                )
            masks = {key: _unpack(track[key].to(bits.device), bits.numel()) for key in _MASKS}
            flipped = bits != masks["previous"]
            never = masks["never_flipped"] & ~flipped
            pending[name] = torch.stack(
                [flipped.double().mean(), (bits != masks["start"]).double().mean(), never.double().mean()]
            )
            track["previous"], track["never_flipped"] = _pack(bits), _pack(never)
            track["start"] = track["start"].to(bits.device)
        values = torch.stack(list(pending.values())).tolist() if pending else []
        for name, (flip, changed, never) in zip(pending, values, strict=True):
            figures[name] = SignFigures(flip, changed, never)
        self.snapshots += 1
        return figures

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state: plain containers, ints and CPU uint8 tensors (``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "snapshots": self.snapshots,
            "layers": {
                name: {"numel": track["numel"], **{key: track[key].detach().cpu().clone() for key in _MASKS}}
                for name, track in self._layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`; the next :meth:`update` continues as if never interrupted."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise TrainingError(f"sign tracker state of version {version}; this binarize reads {STATE_VERSION}")
        layers = {}
        for name, track in state["layers"].items():
            numel = int(track["numel"])
            for key in _MASKS:
                if track[key].dtype != torch.uint8 or track[key].numel() != (numel + 7) // 8:
                    raise TrainingError(f"sign tracker state of layer '{name}' is corrupt ({key})")
            layers[name] = {"numel": numel, **{key: track[key].clone() for key in _MASKS}}
        self._layers = layers
        self.snapshots = int(state["snapshots"])
