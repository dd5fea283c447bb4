"""Tracing a model into a torch.fx graph, with timm's no-trace lists as leaves.

timm registers the modules and functions that symbolic tracing cannot enter (its fused
norm-activation layers, ``Conv2dSame``, position-embedding helpers) through
``timm.layers.register_notrace_module`` / ``register_notrace_function``; the tracer here keeps them
as leaves, as timm's own feature extractor does. Tracing never imports timm: its registries are read
only when timm is already loaded (which it is for any timm model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from binarize._utils import eval_mode
from binarize.nn import ReCUConv2d
from binarize.nn.shortcut import BiRealShortcut

__all__ = ["BinarizeTracer", "trace", "propagate_shapes"]


def _timm_notrace() -> tuple[list[type[nn.Module]], list[Callable]]:
    if "timm" not in sys.modules:
        return [], []
    from timm.layers import _fx as timm_fx

    modules = list(timm_fx.get_notrace_modules())
    functions = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return modules, functions


class BinarizeTracer(fx.Tracer):
    """A symbolic tracer that keeps timm's no-trace modules and binarize's own layers as leaves.

    Args:
        leaf_modules: Extra module classes not to trace into.
        autowrap_functions: Functions to record as calls instead of tracing through.
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = (), autowrap_functions: Sequence[Callable] = ()):
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(timm_functions) + tuple(autowrap_functions))
        self.leaf_types = tuple(timm_modules) + tuple(leaf_modules) + (ReCUConv2d, BiRealShortcut)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types + (nn.Conv2d, nn.Linear)):  # conv subclasses compute their own weight
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Traces ``model`` symbolically; the result shares the model's submodules.

    Raises:
        Exception: Whatever symbolic tracing raises for a model it cannot follow.
    """
    tracer = BinarizeTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Records each node's output shape in ``node.meta['tensor_meta']`` (runs the model in eval mode)."""
    with eval_mode(gm):
        ShapeProp(gm).propagate(*example_inputs)
