"""What both conversion paths share: the facts of each layer, the policy's decisions, and the swap of the
chosen convs for :class:`~binarize.nn.ReCUConv2d`.

A "layer" is every convolution (``nn.Conv1d``/``2d``/``3d``, transposed ones, subclasses) and every
linear layer. Only 2D convolutions whose class is registered as binarizable
(:func:`~binarize.register_binarizable`; ``nn.Conv2d`` and timm's weight-standardised convs are built in)
can become binary; the others are reported as ``unsupported: ...`` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from binarize._utils import replace_submodule
from binarize.conversion import registry
from binarize.conversion.policy import Decision, LayerFacts, Policy, check_rules_match, decide
from binarize.errors import ConfigError
from binarize.nn import LayerOptions, ReCUConv2d

__all__ = [
    "Converted",
    "cfg_names",
    "decide_layers",
    "effective_weight",
    "is_layer_module",
    "layer_facts",
    "layer_modules",
    "swap_binary_layers",
    "under",
    "unsupported_reason",
]


@dataclasses.dataclass
class Converted:
    """What one conversion path did.

    Attributes:
        model: The converted model.
        decisions: The decision for every layer, by qualified name, in module order.
        activations_replaced: The activation call sites replaced in front of binary convs.
        shortcuts: The Bi-Real shortcuts added, ``conv name -> shortcut module name``.
        guessed: The layers whose decision rests on a guess from the module name.
    """

    model: nn.Module
    decisions: dict[str, Decision]
    activations_replaced: list[str] = dataclasses.field(default_factory=list)
    shortcuts: dict[str, str] = dataclasses.field(default_factory=dict)
    guessed: frozenset[str] = frozenset()


def is_layer_module(module: nn.Module) -> bool:
    """A convolution of any kind or a linear layer: the modules the record and the report list."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer of ``model``, in module order."""
    return ((name, m) for name, m in model.named_modules() if is_layer_module(m))


def unsupported_reason(conv: nn.modules.conv._ConvNd) -> str | None:
    """Why ``conv`` cannot become binary (None when it can, or already is)."""
    if isinstance(conv, ReCUConv2d):
        return None
    name = type(conv).__name__
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{name} (transposed convolutions are not binarized)"
    if not isinstance(conv, nn.Conv2d):
        return f"{name} (only 2D convolutions are binarized)"
    if not registry.is_binarizable(type(conv)):
        return f"{name} has a forward of its own"
    return ReCUConv2d.unsupported_reason(conv)


@torch.no_grad()
def effective_weight(conv: nn.Conv2d) -> torch.Tensor | None:
    """The float weight a binarizable conv applies, by its registered function (None: ``conv.weight``).

    Raises:
        ConfigError: The registered function returned something else than a tensor of the weight's shape.
    """
    fn = registry.binarizable_weight(type(conv))
    if fn is None:
        return None
    weight = fn(conv)
    if not isinstance(weight, torch.Tensor) or weight.shape != conv.weight.shape:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(
            f"the effective_weight registered for {type(conv).__name__} returned {got}, expected a tensor of the "
            f"weight's shape {tuple(conv.weight.shape)}"
        )
    return weight.detach().to(conv.weight.dtype)


def cfg_names(model: nn.Module, key: str) -> list[str]:
    """The module names timm's ``pretrained_cfg[key]`` gives (``first_conv``, ``classifier``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    value = cfg.get(key)
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def under(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_facts(name: str, module: nn.Module, unsupported: str | None = None, **flags: bool) -> LayerFacts:
    """The :class:`~binarize.conversion.policy.LayerFacts` of one layer; ``unsupported`` overrides the
    reason the module's type gives."""
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if is_conv and unsupported is None:
        unsupported = unsupported_reason(module)
    return LayerFacts(
        name=name,
        type_names=tuple(c.__name__ for c in type(module).__mro__),
        op="conv" if is_conv else "linear",
        in_channels=module.in_channels if is_conv else module.in_features,
        groups=module.groups if is_conv else 1,
        unsupported=unsupported,
        **flags,
    )


def decide_layers(policy: Policy, layers: list[LayerFacts]) -> dict[str, Decision]:
    """The policy's decision for each layer (rules that match no layer are an error first)."""
    check_rules_match(policy, layers)
    return {f.name: decide(policy, f) for f in layers}


def swap_binary_layers(root: nn.Module, decisions: dict[str, Decision], options: LayerOptions) -> None:
    """Replaces each conv decided binary by a :class:`~binarize.nn.ReCUConv2d` built from the weight it applies."""
    for name, decision in decisions.items():
        conv = root.get_submodule(name)
        if decision.binary and not isinstance(conv, ReCUConv2d):
            replace_submodule(root, name, ReCUConv2d.from_float(conv, effective_weight(conv), options))
