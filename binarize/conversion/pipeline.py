"""The conversion pass: a float model in, a binary model and its record out.

``convert`` = check the arguments -> copy the model -> trace it and propagate shapes
(:mod:`~binarize.conversion.trace`) -> the traced path (:mod:`~binarize.conversion.traced`) or, when
torch.fx cannot follow the model, the untraced path (:mod:`~binarize.conversion.untraced`) -> the
:class:`~binarize.conversion.record.ConversionRecord` of what was done.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from binarize._utils import set_preserved_attr, unwrap
from binarize.conversion.calibration import recalibrate_bn
from binarize.conversion.inputs import as_example_inputs, first_line
from binarize.conversion.layers import Converted, layer_modules
from binarize.conversion.policy import Policy
from binarize.conversion.record import ConversionRecord, LayerRecord, binarize_meta, set_record
from binarize.conversion.registry import qualified_name
from binarize.conversion.trace import propagate_shapes, trace
from binarize.conversion.traced import convert_traced
from binarize.conversion.untraced import convert_untraced
from binarize.errors import ConfigError
from binarize.nn import LayerOptions

__all__ = ["binarize_meta", "convert", "recalibrate_bn"]

_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "binarize_source")


def _leaf_classes(leaf_modules: type[nn.Module] | Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    classes = (leaf_modules,) if isinstance(leaf_modules, type) else tuple(leaf_modules)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"leaf_modules: expected nn.Module classes, got {cls!r}")
    return tuple(dict.fromkeys(classes))


def _check_arguments(model: object, policy: object, layer: object) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(policy, Policy):
        raise ConfigError(f"convert(): policy must be a binarize.Policy, got {type(policy).__name__}")
    if not isinstance(layer, LayerOptions):
        raise ConfigError(f"convert(): layer must be a binarize.LayerOptions, got {type(layer).__name__}")


def _warnings(source: nn.Module, converted: Converted) -> tuple[str, ...]:
    if not any(isinstance(m, nn.modules.conv._ConvNd) for _, m in layer_modules(source)):
        return ("no convolution found: nothing was binarized",)
    if not any(d.binary for d in converted.decisions.values()):
        return ("no convolution was binarized: every conv stays float (the report gives each one's reason)",)
    return ()


def convert(
    model: nn.Module,
    policy: Policy | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    layer: LayerOptions | None = None,
    leaf_modules: type[nn.Module] | Iterable[type[nn.Module]] = (),
) -> nn.Module:
    """Converts a float model into a ReCU binary model.

    The input model is not modified. Eligible convolutions become :class:`binarize.nn.ReCUConv2d`
    (1-bit weights and activations); the policy says which stay float and why. Run
    :func:`recalibrate_bn` on a few batches before evaluating the result.

    Args:
        model: Any ``nn.Module`` (timm, torchvision or your own).
        policy: What to binarize; :class:`~binarize.Policy` defaults when omitted.
        example_inputs: A tuple of input tensors, as ``torch.export`` takes them (or one tensor); one zero
            image of the model's timm input size (else 3x224x224) when omitted. Used to trace shapes and
            count MACs.
        layer: Options of the binary layers (weight binarization, activation bias, initial tau);
            :class:`~binarize.nn.LayerOptions` defaults when omitted.
        leaf_modules: Module classes torch.fx should not trace into, for this conversion only (see
            :func:`~binarize.register_leaf_module`); recorded, so :func:`binarize.load` passes them again.

    Returns:
        A new module (a ``torch.fx.GraphModule`` when the model traces) carrying its
        :class:`~binarize.conversion.record.ConversionRecord` (:func:`binarize_meta` reads it), which
        :func:`binarize.inspect` and :func:`binarize.save` use.

    Raises:
        ConfigError: An argument has the wrong type, a policy rule matches no layer, or the example
            inputs do not fit the model (one line naming the layer and the shapes).

    Example::

        >>> import torchvision
        >>> binary = convert(torchvision.models.resnet18(num_classes=10))
        >>> type(binary.layer1[0].conv1).__name__
        'ReCUConv2d'
    """
    policy = policy if policy is not None else Policy()
    layer = layer if layer is not None else LayerOptions()
    _check_arguments(model, policy, layer)
    leaves = _leaf_classes(leaf_modules)
    source = unwrap(model)
    model = copy.deepcopy(source)
    example_inputs = as_example_inputs(model, example_inputs)
    trace_error = None
    try:
        gm = trace(model, leaves)
        propagate_shapes(gm, example_inputs)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: convert without a graph
        gm, trace_error = None, first_line(err)
    if gm is not None:
        converted = convert_traced(gm, model, policy, layer)
    else:
        converted = convert_untraced(model, policy, layer, example_inputs)
    result = converted.model
    for attr in _CARRIED_ATTRS:
        if hasattr(source, attr):
            set_preserved_attr(result, attr, copy.deepcopy(getattr(source, attr)))
    record = ConversionRecord(
        policy=policy,
        layer=layer,
        input_size=tuple(int(v) for v in example_inputs[0].shape[1:]),
        traced=gm is not None,
        trace_error=trace_error,
        layers={
            name: LayerRecord("binary" if d.binary else "float", d.reason, name in converted.guessed)
            for name, d in converted.decisions.items()
        },
        activations_replaced=tuple(converted.activations_replaced),
        shortcuts=dict(converted.shortcuts),
        leaf_modules=tuple(qualified_name(cls) for cls in leaves),
        warnings=_warnings(source, converted),
    )
    set_record(result, record)
    return result
