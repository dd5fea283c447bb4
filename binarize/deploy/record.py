"""The packing record: what :func:`binarize.deploy.pack` did, stored in a packed file's metadata."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from binarize._utils import unwrap
from binarize.config import Config, check
from binarize.errors import BinarizeError

__all__ = ["PACKED_ATTR", "PACKED_RECORD_VERSION", "ExportError", "PackedLayerRecord", "PackedRecord", "packed_meta"]

PACKED_ATTR = "binarize_packed"
PACKED_RECORD_VERSION = 1


class ExportError(BinarizeError):
    """A model cannot be exported as it is (the message names the layer and what to do)."""


@dataclasses.dataclass(frozen=True)
class PackedLayerRecord(Config):
    """One binary convolution of a packed model.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: ``(kh, kw)``.
        stride: As in ``nn.Conv2d``.
        padding: Pixels on each side, ``(ph, pw)``.
        dilation: As in ``nn.Conv2d``.
        groups: As in ``nn.Conv2d`` (more than 1 runs the layer's pure-torch path).
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        activation_bias: Whether the layer adds a per-input-channel bias before the sign.
        norm: The BatchNorm folded into ``mul``/``add`` (it became an identity), or None.
        note: Why no BatchNorm was folded, when none was.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"]
    activation_bias: bool
    norm: str | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class PackedRecord(Config):
    """What packing did to a converted model.

    Args:
        layers: The packed binary convolutions by qualified name, in module order.
        float_folds: The float convolutions a BatchNorm was folded into, ``conv name -> norm name``.
        float_dtype: How the file stores the float layers' tensors (``fp32`` or ``fp16``); the model
            computes in float32 either way.
        version: Schema version of this record.
    """

    layers: dict[str, PackedLayerRecord] = dataclasses.field(default_factory=dict)
    float_folds: dict[str, str] = dataclasses.field(default_factory=dict)
    float_dtype: Literal["fp32", "fp16"] = "fp32"
    version: int = PACKED_RECORD_VERSION

    def validate(self) -> None:
        check(
            self.version == PACKED_RECORD_VERSION,
            "version",
            f"this binarize reads packing records of version {PACKED_RECORD_VERSION}, got {self.version}",
        )

    @property
    def folded_norms(self) -> tuple[str, ...]:
        """Every BatchNorm folded away (into a binary or a float conv)."""
        binary = [r.norm for r in self.layers.values() if r.norm is not None]
        return tuple(binary) + tuple(self.float_folds.values())


def packed_meta(model: nn.Module) -> PackedRecord | None:
    """The packing record of a packed model (None for any other model)."""
    record = getattr(unwrap(model), PACKED_ATTR, None)
    return record if isinstance(record, PackedRecord) else None
