"""Tracing a model into a torch.fx graph, and recording the shape of every value.

The tracer keeps as leaves (single ``call_module`` nodes) every convolution and linear layer, the
classes of :mod:`binarize.conversion.registry` (binarize's own layers, registered leaves and
activations), the classes a conversion passes in, and timm's no-trace modules: timm registers the
modules and functions symbolic tracing cannot enter (its fused norm-activation layers,
``Conv2dSame``, position-embedding helpers) through ``timm.layers.register_notrace_module`` /
``register_notrace_function``, and its own feature extractor keeps them as leaves too. Tracing never
imports timm: its registries are read only when timm is already loaded (which it is for any timm
model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from binarize._utils import eval_mode
from binarize.conversion import registry

__all__ = ["BinarizeTracer", "node_shape", "propagate_shapes", "trace"]

SHAPE_KEY = "binarize_shape"
"""``node.meta`` key of the shape of a node's tensor output (absent for other outputs)."""


def _timm_notrace() -> tuple[list[type[nn.Module]], list[Callable]]:
    if "timm" not in sys.modules:
        return [], []
    from timm.layers import _fx as timm_fx

    modules = list(timm_fx.get_notrace_modules())
    functions = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return modules, functions


class BinarizeTracer(fx.Tracer):
    """A symbolic tracer that keeps layers, registered classes and timm's no-trace modules as leaves.

    Args:
        leaf_modules: Extra module classes not to trace into.
        autowrap_functions: Functions to record as calls instead of tracing through.
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = (), autowrap_functions: Sequence[Callable] = ()):
        timm_modules, timm_functions = _timm_notrace()
        functions = dict.fromkeys((*timm_functions, *registry.tracer_functions(), *autowrap_functions))
        super().__init__(autowrap_functions=tuple(functions))
        self.leaf_types = (*timm_modules, *leaf_modules, *registry.leaf_types())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # conv and linear subclasses compute their own weight: the pass decides what to do with each one
        if isinstance(m, (*self.leaf_types, nn.modules.conv._ConvNd, nn.Linear)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """Traces ``model`` symbolically; the result shares the model's submodules.

    Args:
        model: The model.
        leaf_modules: Module classes to keep as leaves in this trace, besides the registered ones.

    Raises:
        Exception: Whatever symbolic tracing raises for a model it cannot follow.
    """
    tracer = BinarizeTracer(leaf_modules)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph node by node and stores each tensor output's shape in ``node.meta``. Unlike torch's
    ``ShapeProp`` it prints nothing when a node fails: the error goes to the caller as it is."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(result.shape)
        return result


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Records the shape of each node's tensor output (:func:`node_shape`), running the model in eval mode.

    Raises:
        Exception: Whatever a node raises for these inputs.
    """
    with eval_mode(gm):
        _ShapeRecorder(gm).run(*example_inputs)


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The shape :func:`propagate_shapes` recorded for ``node`` (None: not a node, or not a tensor output)."""
    return node.meta.get(SHAPE_KEY) if isinstance(node, fx.Node) else None
