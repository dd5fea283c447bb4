"""The untraced path: conversion by module names, for models torch.fx cannot trace.

Without a graph the pass sees only what one eager run with forward hooks shows: the first and last
layer come from the execution order, and an activation *module* is found to feed a binary conv by
tensor identity (through BatchNorm, pooling, padding, dropout and identity modules). Two facts need the
data flow and are guessed from module names instead: 1x1 shortcut convs (a ``downsample``, ``shortcut``
or ``skip`` in the name) and squeeze-excitation convs (``se``, ``squeeze_excite``); a decision that rests
on such a guess is recorded as guessed, and the report says so. The decisions, the replacement of
activations and the swap of convs are the traced path's own code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from binarize.conversion.graph import is_activation_module, is_fused_norm_act, is_pass_through_module
from binarize.conversion.inputs import run_checked
from binarize.conversion.layers import (
    Converted,
    cfg_names,
    decide_layers,
    is_layer_module,
    layer_facts,
    layer_modules,
    swap_binary_layers,
    under,
)
from binarize.conversion.policy import Policy, decide
from binarize.conversion.rewrite import replace_activation_module
from binarize.nn import LayerOptions

__all__ = ["SE_NAMES", "SHORTCUT_NAMES", "convert_untraced", "record_calls"]

SHORTCUT_NAMES = ("downsample", "shortcut", "skip")
"""Module-name parts that mark a 1x1 conv as a residual shortcut (torchvision's, timm's and common names)."""
SE_NAMES = ("se", "squeeze_excite")
"""Module-name parts that mark a conv as part of a squeeze-and-excitation gate."""

Call = tuple[str, nn.Module, Any, Any]
"""``(module name, module, first positional input, output)`` of one module call."""


def record_calls(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[Call]:
    """Runs the model once with hooks: ``(name, module, input, output)`` for every call of a module without
    children, of a fused norm-act layer or of a conv/linear layer, in execution order.

    Raises:
        ConfigError: The example inputs do not fit the model (the message names the layer).
    """
    calls: list[Call] = []
    modules = [
        (name, m)
        for name, m in model.named_modules()
        if name and not list(m.children()) or is_fused_norm_act(m) or is_layer_module(m)
    ]

    def record(name: str, module: nn.Module, args: tuple, out: Any) -> None:
        calls.append((name, module, args[0] if args else None, out))

    run_checked(model, example_inputs, modules, record)
    return calls


def _feeding_activation(producer: dict[int, Call], layer_input: torch.Tensor) -> str | None:
    """The name of the activation module whose output reaches ``layer_input`` through pass-through modules."""
    found = producer.get(id(layer_input))
    while found is not None:
        name, module, inp, _ = found
        if is_activation_module(module) or is_fused_norm_act(module):
            return name
        if not is_pass_through_module(module) or not isinstance(inp, torch.Tensor):
            return None
        found = producer.get(id(inp))
    return None


def convert_untraced(
    model: nn.Module, policy: Policy, options: LayerOptions, example_inputs: Sequence[torch.Tensor]
) -> Converted:
    """Converts ``model`` in place by module names.

    Raises:
        ConfigError: The example inputs do not fit the model, or a rule matches no layer.
    """
    calls = record_calls(model, example_inputs)
    layer_calls = [c for c in calls if is_layer_module(c[1])]
    first = ([layer_calls[0][0]] if layer_calls else []) + cfg_names(model, "first_conv")
    last = ([layer_calls[-1][0]] if layer_calls else []) + cfg_names(model, "classifier")
    layers, guessed_facts = [], {}
    for name, module in layer_modules(model):
        parts = name.split(".")
        shortcut = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
        facts = layer_facts(
            name,
            module,
            is_first=under(name, first),
            is_last=under(name, last),
            is_shortcut_1x1=shortcut and any(p in SHORTCUT_NAMES for p in parts),
            is_se=any(p in SE_NAMES for p in parts),
        )
        layers.append(facts)
        if facts.is_shortcut_1x1 or facts.is_se:
            guessed_facts[name] = dataclasses.replace(facts, is_shortcut_1x1=False, is_se=False)
    decisions = decide_layers(policy, layers)
    guessed = frozenset(n for n, f in guessed_facts.items() if decide(policy, f) != decisions[n])
    replaced: list[str] = []
    producer = {id(c[3]): c for c in calls if isinstance(c[3], torch.Tensor)}
    if policy.activation != "keep":
        for name, _, inp, _ in layer_calls:
            if not decisions[name].binary or not isinstance(inp, torch.Tensor):
                continue
            act = _feeding_activation(producer, inp)
            if act is not None and act not in replaced:  # one module, replaced at every call of it
                replace_activation_module(model, act, policy.activation, inp.shape[1] if inp.dim() > 1 else 1)
                replaced.append(act)
    swap_binary_layers(model, decisions, options)
    return Converted(model, decisions, replaced, {}, guessed)
