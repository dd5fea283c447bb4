"""Small helpers that several parts of binarize share (internal; not public API)."""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "closest",
    "default_example_inputs",
    "eval_mode",
    "mix_seed",
    "nearest",
    "replace_submodule",
    "run_with_hooks",
    "run_batches",
    "set_preserved_attr",
    "unwrap",
]

DEFAULT_INPUT_SIZE = (3, 224, 224)
_MASK64 = (1 << 64) - 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def default_example_inputs(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[torch.Tensor]:
    """One zero image: ``input_size``, else the model's timm ``pretrained_cfg`` size, else 3x224x224."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size") or DEFAULT_INPUT_SIZE
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return (torch.zeros(1, *input_size, device=device),)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts every submodule in eval mode, then restores each one's own mode (a training model may hold
    frozen, eval-mode parts: ``model.train(was_training)`` would unfreeze them)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def run_with_hooks(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    modules: Iterable[tuple[str, nn.Module]],
    on_call: Callable[[str, nn.Module, tuple, Any], None],
) -> None:
    """Runs ``model(*inputs)`` once in eval mode, calling ``on_call(name, module, args, output)`` after
    every call of each of ``modules``; the hooks are removed afterwards, also on errors."""
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: on_call(name, m, args, out))
        for name, module in modules
    ]
    try:
        with eval_mode(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_batches(
    model: nn.Module,
    batches: Iterable,
    max_batches: int | None,
    modules: Iterable[tuple[str, nn.Module]],
    on_input: Callable[[str, nn.Module, tuple], None],
) -> int:
    """Runs up to ``max_batches`` batches (tensors or ``(inputs, targets, ...)``) through ``model`` in eval
    mode on its device, calling ``on_input(name, module, args)`` before every call of each of ``modules``;
    the hooks are removed afterwards, also on errors. Returns how many batches ran."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: on_input(name, m, args)) for name, module in modules
    ]
    ran = 0
    try:
        with eval_mode(model):
            for batch in itertools.islice(batches, max_batches):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device, non_blocking=True))
                ran += 1
    finally:
        for handle in handles:
            handle.remove()
    return ran


def set_preserved_attr(module: nn.Module, name: str, value: Any) -> None:
    """Sets an attribute that survives ``copy.deepcopy`` also on a ``torch.fx.GraphModule`` (whose deepcopy
    rebuilds the module and keeps only the attributes listed in its ``meta``)."""
    setattr(module, name, value)
    meta = getattr(module, "meta", None)
    if isinstance(module, torch.fx.GraphModule) and isinstance(meta, dict):
        meta.setdefault("_user_preserved_attributes", {})[name] = value


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Sets the submodule at the dotted ``name`` (``layer1.0.conv1``) of ``root`` to ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def nearest(word: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def closest(word: str, choices: Iterable[str], n: int = 5) -> str:
    """A ``"; closest: a, b"`` suffix naming up to ``n`` close choices, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f"; closest: {', '.join(close)}" if close else ""


def mix_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of ``values`` (chained SplitMix64 finalisers)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = ((state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        state ^= state >> 31
        state = ((state + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 29
    return state >> 1
