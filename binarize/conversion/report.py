"""What a conversion did, layer by layer, and what the binary model costs.

Counting conventions (those of the BNN literature, e.g. Bi-Real Net and ReActNet):

* ``bops``: multiply-accumulates of the binary convolutions for one input image (each is one
  XNOR-popcount bit operation);
* ``flops``: multiply-accumulates of the float convolutions and linear layers for one image;
* ``ops = flops + bops / 64`` (a 64-bit word computes 64 binary MACs at once);
* ``fp32_bytes``: every parameter and floating-point buffer stored as float32;
* ``packed_bytes``: binary weights at 1 bit each, everything else as float32 (the deployable form:
  the scale ``alpha`` folds into the next BatchNorm but is still counted).

The ReCU quantile ``tau`` is training state and counts in neither size.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from binarize._utils import default_example_inputs, unwrap
from binarize.conversion.inputs import run_checked
from binarize.conversion.layers import is_layer_module
from binarize.conversion.record import binarize_meta
from binarize.nn import ReCUConv2d

__all__ = ["GUESSED", "LayerEntry", "Report", "ReportSummary", "inspect"]

GUESSED = " (guessed from the name)"
"""Appended to the reason of a decision the untraced path based on a module name (``1x1 shortcut``,
``squeeze-excitation``): without a graph the pass cannot see the data flow that shows the role."""


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One convolution or linear layer of the model.

    Args:
        name: Qualified module name.
        op: Module class name (``ReCUConv2d``, ``Conv2d``, ``Linear``, ...).
        shape: Weight shape.
        decision: ``binary`` or ``float``.
        reason: Why (``first conv``, ``depthwise``, ``user rule keep:layer4.*``, ``binarized``, ...).
        macs: Multiply-accumulates for one input image (0 if the layer did not run).
    """

    name: str
    op: str
    shape: list[int]
    decision: str
    reason: str
    macs: int


@dataclasses.dataclass(frozen=True)
class ReportSummary:
    """The costs of a model and what its conversion did (the counting conventions: module docstring).

    Args:
        binary_convs: Binary convolutions.
        float_convs: Convolutions that stay float.
        float_linears: Linear layers (all float).
        binary_mac_fraction: Share of the multiply-accumulates done by binary convolutions.
        params: Parameter count.
        fp32_bytes: Every parameter and saved floating-point buffer as float32.
        packed_bytes: Binary weights at 1 bit each, everything else as float32.
        bops: Binary multiply-accumulates for one image.
        flops: Float multiply-accumulates for one image.
        ops: ``flops + bops / 64``.
        traced: Whether the conversion traced the model (None: not converted by binarize).
        input_size: The input size the MACs were counted at, ``[C, H, W]``.
        activations_replaced: Activation call sites replaced in front of binary convs.
        shortcuts_added: Bi-Real shortcuts added.
        policy: The conversion's policy as a dict (None: not converted by binarize).
        trace_error: Why tracing failed, when it did.
        warnings: What the conversion warned about.
    """

    binary_convs: int
    float_convs: int
    float_linears: int
    binary_mac_fraction: float
    params: int
    fp32_bytes: int
    packed_bytes: int
    bops: int
    flops: int
    ops: float
    traced: bool | None
    input_size: list[int]
    activations_replaced: int
    shortcuts_added: int
    policy: dict[str, Any] | None
    trace_error: str | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The summary with plain JSON types (``trace_error`` and ``warnings`` only when present)."""
        data = dataclasses.asdict(self)
        data["warnings"] = list(self.warnings)
        for key in ("trace_error", "warnings"):
            if not data[key]:
                del data[key]
        return data


@dataclasses.dataclass(frozen=True)
class Report:
    """The layers of a (converted) model and a summary of its costs."""

    layers: tuple[LayerEntry, ...]
    summary: ReportSummary

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": [...], "summary": {...}}`` with plain JSON types."""
        return {"layers": [dataclasses.asdict(e) for e in self.layers], "summary": self.summary.to_dict()}


def _packed_type() -> type | None:
    """:class:`binarize.nn.PackedBinaryConv2d` when its module is loaded (a model can only hold one then),
    else None: reading a report never loads the runtime."""
    return getattr(sys.modules.get("binarize.nn.packed"), "PackedBinaryConv2d", None)


def _is_packed(module: nn.Module) -> bool:
    packed = _packed_type()
    return packed is not None and isinstance(module, packed)


def _report_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers the report lists: convs of any kind, linear layers and packed binary convs."""
    return [(name, m) for name, m in model.named_modules() if is_layer_module(m) or _is_packed(m)]


def _weight_shape(module: nn.Module) -> list[int]:
    if _is_packed(module):  # the logical shape of its bit-packed weights
        return [module.out_channels, module.in_channels // module.groups, *module.kernel_size]
    return list(module.weight.shape)


def _macs_per_image(module: nn.Module, args: tuple, out: Any) -> int:
    """Multiply-accumulates of one call of a conv or linear layer, per image of the batch."""
    if not isinstance(out, torch.Tensor):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input value meets every kernel tap
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        per_image = x[0].numel() if x is not None and x.dim() > len(module.kernel_size) + 1 else 0
        return per_image * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    per_image = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.modules.conv._ConvNd) or _is_packed(module):
        return per_image * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return per_image * module.in_features


def _count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    macs: dict[str, int] = {}

    def count(name: str, module: nn.Module, args: tuple, out: Any) -> None:
        macs[name] = macs.get(name, 0) + _macs_per_image(module, args, out)

    run_checked(model, example_inputs, _report_modules(model), count)
    return macs


def _tensor_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(parameter count, float32 bytes of all state, float32 bytes of the binary layers' weights)."""
    params = sum(p.numel() for p in model.parameters())
    state = sum(p.numel() for p in model.parameters())
    saved = model.state_dict(keep_vars=True).keys()  # not the non-persistent buffers (ReCUConv2d.threshold)
    for name, buf in model.named_buffers():
        if name in saved and buf.is_floating_point() and not name.endswith(".tau") and name != "tau":
            state += buf.numel()
    binary_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, ReCUConv2d) and m.binarize_weights)
    packed_weights = sum(math.prod(_weight_shape(m)) for m in model.modules() if _is_packed(m))
    return params, 4 * (state + packed_weights), 4 * (binary_weights + packed_weights)


def inspect(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> Report:
    """The report of a model: every conv/linear layer with its decision, and the cost summary.

    Works on any model; a converted one (also one loaded by :func:`binarize.load`) carries the
    decisions and reasons of its conversion, other layers are described by their type.

    Args:
        model: The model.
        example_inputs: Inputs (a tuple, or one tensor) to count MACs with; by default one image of the
            size used at conversion (else the timm input size, else 3x224x224).

    Raises:
        ConfigError: The example inputs do not fit the model (one line naming the layer and the shapes).

    Example::

        >>> report = inspect(binary_model)
        >>> report.to_dict()["summary"]["binary_convs"]
        16
    """
    model = unwrap(model)
    record = binarize_meta(model)
    if example_inputs is None:
        example_inputs = default_example_inputs(model, record.input_size if record else None)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    macs = _count_macs(model, example_inputs)
    recorded = record.layers if record else {}
    layers, linears = [], 0
    for name, module in _report_modules(model):
        linears += isinstance(module, nn.Linear)  # by type: Linear subclasses have other class names
        binary = isinstance(module, ReCUConv2d) or _is_packed(module)
        reason = recorded[name].reason if name in recorded else ("binarized" if binary else "not converted")
        if name in recorded and recorded[name].guessed:
            reason += GUESSED
        if binary and not getattr(module, "binarize_weights", True):
            reason += " (activations only)"
        layers.append(
            LayerEntry(
                name=name,
                op=type(module).__name__,
                shape=_weight_shape(module),
                decision="binary" if binary else "float",
                reason=reason,
                macs=int(macs.get(name, 0)),
            )
        )
    bops = sum(e.macs for e in layers if e.decision == "binary")
    flops = sum(e.macs for e in layers if e.decision == "float")
    params, fp32_bytes, binary_fp32 = _tensor_bytes(model)
    packed_binary = sum(
        (m.weight.numel() + 7) // 8 for m in model.modules() if isinstance(m, ReCUConv2d) and m.binarize_weights
    ) + sum((math.prod(_weight_shape(m)) + 7) // 8 for m in model.modules() if _is_packed(m))
    summary = ReportSummary(
        binary_convs=sum(e.decision == "binary" for e in layers),
        float_convs=sum(e.decision == "float" for e in layers) - linears,
        float_linears=linears,
        binary_mac_fraction=bops / (bops + flops) if bops + flops else 0.0,
        params=params,
        fp32_bytes=fp32_bytes,
        packed_bytes=fp32_bytes - binary_fp32 + packed_binary,
        bops=bops,
        flops=flops,
        ops=flops + bops / 64,
        traced=record.traced if record else None,
        input_size=[int(s) for s in example_inputs[0].shape[1:]],
        activations_replaced=len(record.activations_replaced) if record else 0,
        shortcuts_added=len(record.shortcuts) if record else 0,
        policy=record.policy.to_dict() if record else None,
        trace_error=record.trace_error if record else None,
        warnings=record.warnings if record else (),
    )
    return Report(tuple(layers), summary)
