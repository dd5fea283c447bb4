"""The conversion record: what :func:`binarize.convert` did to a model, as a versioned, frozen record.

Every converted model carries one (:func:`binarize_meta` reads it, also through DDP and
``torch.compile`` wrappers). The report, the model file and the engine read it; nothing else is
needed to know which layers are binary and why. :meth:`ConversionRecord.to_dict` is the JSON the
model file stores (docs/file-format.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from binarize._utils import set_preserved_attr, unwrap
from binarize._version import __version__
from binarize.config import Config, check
from binarize.conversion.policy import Policy
from binarize.nn.options import LayerOptions

__all__ = ["RECORD_ATTR", "RECORD_VERSION", "ConversionRecord", "LayerRecord", "binarize_meta", "set_record"]

RECORD_ATTR = "binarize_meta"
RECORD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerRecord(Config):
    """The decision for one convolution or linear layer.

    Args:
        decision: ``binary`` or ``float``.
        reason: Why (``first conv``, ``depthwise``, ``user rule keep:layer4.*``, ``binarized``, ...).
        guessed: The decision rests on a guess from the module's name, not on the traced graph (the
            untraced fallback recognises shortcut and squeeze-excitation convs by name only).
    """

    decision: Literal["binary", "float"]
    reason: str
    guessed: bool = False

    @property
    def binary(self) -> bool:
        return self.decision == "binary"


@dataclasses.dataclass(frozen=True)
class ConversionRecord(Config):
    """What one conversion did.

    Args:
        policy: The policy it followed.
        layer: The options of the binary layers it created.
        input_size: The example input's size, ``(C, H, W)``.
        traced: Whether torch.fx traced the model (else layers were converted by module name).
        trace_error: Why tracing failed, when it did.
        layers: The decision for every conv and linear layer, by qualified name, in module order.
        activations_replaced: The activation call sites replaced in front of binary convs.
        shortcuts: The Bi-Real shortcuts added, ``binary conv name -> shortcut module name``.
        leaf_modules: Qualified names of the module classes the tracer kept as leaves at the
            caller's request (``convert(..., leaf_modules=...)``).
        warnings: What the user should know (for example: no convolution found).
        library_version: The binarize version that converted the model.
        version: Schema version of this record.
    """

    policy: Policy
    layer: LayerOptions
    input_size: tuple[int, ...]
    traced: bool
    trace_error: str | None = None
    layers: dict[str, LayerRecord] = dataclasses.field(default_factory=dict)
    activations_replaced: tuple[str, ...] = ()
    shortcuts: dict[str, str] = dataclasses.field(default_factory=dict)
    leaf_modules: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    library_version: str = __version__
    version: int = RECORD_VERSION

    def validate(self) -> None:
        check(
            self.version == RECORD_VERSION,
            "version",
            f"this binarize reads conversion records of version {RECORD_VERSION}, got {self.version}",
        )

    @property
    def binary_layers(self) -> tuple[str, ...]:
        """Qualified names of the layers that became binary, in module order."""
        return tuple(name for name, layer in self.layers.items() if layer.binary)


def binarize_meta(model: nn.Module) -> ConversionRecord | None:
    """The conversion record of a converted model (also inside DDP or ``torch.compile``), or None."""
    record = getattr(unwrap(model), RECORD_ATTR, None)
    return record if isinstance(record, ConversionRecord) else None


def set_record(model: nn.Module, record: ConversionRecord) -> None:
    """Attaches (or replaces) the conversion record of ``model``; it survives ``copy.deepcopy``."""
    set_preserved_attr(unwrap(model), RECORD_ATTR, record)
