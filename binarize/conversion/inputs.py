"""Example inputs: checking what the caller passed, and running the model eagerly with a one-line error that
names the layer when the inputs do not fit (instead of torch's traceback)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from binarize._utils import default_example_inputs, run_with_hooks
from binarize.errors import ConfigError

__all__ = ["as_example_inputs", "describe_failure", "first_line", "run_checked"]


def as_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of tensors (one zero image of the model's input size when None).

    Raises:
        ConfigError: They are not tensors.
    """
    if example_inputs is None:
        return default_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):  # one tensor, not a tuple: tuple() would split its batch
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ConfigError(
            f"example_inputs: expected a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    inputs = tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"example_inputs[{i}]: expected a tensor, got {type(x).__name__}")
    if inputs[0].dim() < 1:
        raise ConfigError("example_inputs[0]: expected a batch (N, C, ...), got a 0-dim tensor")
    return inputs


def _size(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape)


def describe_failure(name: str, module: nn.Module, args: tuple, err: Exception, example: torch.Tensor) -> str:
    """One line saying which layer the example input did not fit, and how; ``name`` is the innermost module
    whose call failed ("" for the model's own forward)."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    label = name or f"the model's forward ({type(module).__name__})"
    origin = "the example input" if x is example else "its input"
    if isinstance(module, nn.modules.conv._ConvNd) and x is not None:
        spatial = len(module.kernel_size)
        if x.dim() != spatial + 2:
            dims = {1: "N, C, L", 2: "N, C, H, W", 3: "N, C, D, H, W"}.get(spatial, "N, C, ...")
            kind = f"{label} ({type(module).__name__})"
            what = f"{kind} expects {spatial + 2}-dimensional input ({dims}), {origin} is {_size(x)}"
        elif x.shape[1] != module.in_channels:
            what = f"{label} expects {module.in_channels} input channels, {origin} has {x.shape[1]}"
        else:
            what = f"{label} ({type(module).__name__}) failed on {origin} of size {_size(x)}: {first_line(err)}"
    elif isinstance(module, nn.Linear) and x is not None and x.dim() >= 1 and x.shape[-1] != module.in_features:
        what = f"{label} expects {module.in_features} input features, {origin} has {x.shape[-1]} (size {_size(x)})"
    else:
        what = f"{label} failed on the example input of size {_size(example)}: {first_line(err)}"
    return f"{what}; pass example inputs of the model's input size"


def first_line(err: Exception) -> str:
    """``"TypeName: first line of the message"`` (the type alone for an empty message)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def run_checked(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    modules: Iterable[tuple[str, nn.Module]],
    on_call: Callable[[str, nn.Module, tuple, Any], None],
) -> None:
    """:func:`binarize._utils.run_with_hooks` (``on_call(name, module, args, output)`` after each call of
    ``modules``), with a one-line error when the model fails on the inputs.

    Raises:
        ConfigError: The model failed on the inputs; the message names the innermost module whose call
            failed and, for a conv or linear layer, the shapes that do not fit.
    """
    watched = {id(m): name for name, m in modules}
    stack: list[tuple[str, nn.Module, tuple]] = []  # the modules whose call has started and not ended

    def leave(name: str, module: nn.Module, args: tuple, out: Any) -> None:
        while stack and stack[-1][1] is not module:  # a call whose error the model caught itself
            stack.pop()
        if stack:
            stack.pop()
        if id(module) in watched:
            on_call(watched[id(module)], module, args, out)

    named = list(model.named_modules())
    handles = [m.register_forward_pre_hook(lambda m, args, n=n: stack.append((n, m, args))) for n, m in named]
    try:
        run_with_hooks(model, inputs, named, leave)
    except Exception as err:
        if not stack:
            raise
        name, module, args = stack[-1]
        raise ConfigError(describe_failure(name, module, args, err, inputs[0])) from err
    finally:
        for handle in handles:
            handle.remove()
