"""Reading a traced model: which nodes are convolutions, activations and pass-through ops, and the
data-flow facts the :class:`~binarize.conversion.policy.Policy` needs (first conv, last layer, 1x1 shortcuts,
squeeze-and-excitation convs). What counts as a ReLU-like activation comes from
:mod:`binarize.conversion.registry`.

All walks follow ``graph.nodes`` order or explicit lists, never sets of nodes, so results are
deterministic (the torch.fx documentation's advice).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from binarize.conversion import registry
from binarize.conversion.trace import node_shape

__all__ = ["GraphFacts", "PASS_MODULES", "is_activation_module", "is_fused_norm_act", "is_pass_through_module"]

PASS_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.Identity, nn.modules.dropout._DropoutNd, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)  # fmt: skip
"""Modules a sign can look through (BatchNorm, pooling, padding, dropout, identity), in both conversion paths."""
_PASS_FUNCTIONS = (
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad, F.dropout, F.batch_norm,
)  # fmt: skip
_PASS_METHODS = frozenset({"contiguous", "clone"})
_STRUCTURAL_FUNCTIONS = (
    torch.cat, torch.concat, torch.stack, torch.split, torch.chunk, torch.flatten, torch.reshape, torch.transpose,
    torch.permute, torch.narrow, torch.squeeze, torch.unsqueeze, torch.roll, operator.getitem, F.pixel_shuffle,
    F.pixel_unshuffle, torch.sum,
)  # fmt: skip
_STRUCTURAL_METHODS = frozenset(
    {"view", "reshape", "flatten", "transpose", "permute", "split", "chunk", "narrow", "squeeze", "unsqueeze",
     "expand", "expand_as", "repeat", "roll", "sum"}
)  # fmt: skip
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)
_PRODUCT_TARGETS = (operator.mul, operator.imul, torch.mul)
_GATE_TYPE_NAMES = frozenset({"Sigmoid", "Hardsigmoid", "HardSigmoid", "GateSigmoid", "Softmax", "RadixSoftmax"})
_GATE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax)


def is_activation_module(module: nn.Module) -> bool:
    """A ReLU-family activation module: an instance of a class :func:`~binarize.register_activation` registered
    (torch's and timm's are built in)."""
    return isinstance(module, registry.activation_types())


def is_fused_norm_act(module: nn.Module) -> bool:
    """A timm fused norm-activation layer (``BatchNormAct2d`` and friends) with a ReLU-family act."""
    act = getattr(module, "act", None)
    return isinstance(act, nn.Module) and is_activation_module(act) and not is_activation_module(module)


def is_pass_through_module(module: nn.Module) -> bool:
    """BatchNorm, pooling, padding, dropout or identity (not a fused norm-act layer)."""
    return isinstance(module, PASS_MODULES) and not is_fused_norm_act(module)


class GraphFacts:
    """Node classification and data-flow facts of one traced model.

    Args:
        gm: The traced model, with shapes propagated (:func:`~binarize.conversion.trace.propagate_shapes`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def is_conv(self, node: fx.Node) -> bool:
        return isinstance(self.module(node), nn.Conv2d)

    def is_layer(self, node: fx.Node) -> bool:
        return isinstance(self.module(node), (nn.Conv2d, nn.Linear))

    def is_activation(self, node: fx.Node) -> bool:
        """A ReLU-family activation, or a fused norm-act layer whose act is one."""
        m = self.module(node)
        if m is not None:
            return is_activation_module(m) or is_fused_norm_act(m)
        if node.op == "call_function":
            return node.target in registry.activation_functions()
        return node.op == "call_method" and node.target in registry.activation_methods()

    def is_pass_through(self, node: fx.Node) -> bool:
        """BatchNorm, pooling, padding, dropout and identity: ops a sign can look through."""
        m = self.module(node)
        if m is not None:
            return is_pass_through_module(m)
        if node.op == "call_function":
            return node.target in _PASS_FUNCTIONS
        return node.op == "call_method" and node.target in _PASS_METHODS

    def is_gate(self, node: fx.Node) -> bool:
        m = self.module(node)
        if m is not None:
            return type(m).__name__ in _GATE_TYPE_NAMES
        if node.op == "call_function":
            return node.target in _GATE_FUNCTIONS
        return node.op == "call_method" and node.target in ("sigmoid", "sigmoid_", "softmax")

    def is_global_pool(self, node: fx.Node) -> bool:
        shape = node_shape(node)
        return shape is not None and len(shape) == 4 and shape[2] == 1 and shape[3] == 1 and not self.is_layer(node)

    def is_structural(self, node: fx.Node) -> bool:
        """Ops that move values without changing their signs: concatenation, splits, indexing, reshapes, and
        sums over a dimension (split attention adds its branches that way)."""
        if node.op == "call_function":
            return node.target in _STRUCTURAL_FUNCTIONS
        return node.op == "call_method" and node.target in _STRUCTURAL_METHODS

    def is_product(self, node: fx.Node) -> bool:
        """Elementwise multiplication (a squeeze-and-excitation gate applied to features)."""
        if node.op == "call_function":
            return node.target in _PRODUCT_TARGETS
        return node.op == "call_method" and node.target in ("mul", "mul_")

    def is_add(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target in _ADD_TARGETS
        return node.op == "call_method" and node.target in ("add", "add_")

    def source(self, node: fx.Node) -> fx.Node:
        """Walks back from ``node`` through pass-through ops to the node that produced the value."""
        while self.is_pass_through(node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def layer_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.gm.graph.nodes if self.is_layer(n))

    def first_convs(self) -> list[fx.Node]:
        """The convs reached from an input without passing another conv or linear layer."""
        return [n for n in self._frontier(self._placeholders(), forward=True) if self.is_conv(n)]

    def last_layers(self) -> list[fx.Node]:
        """The conv or linear layers that feed the output: they reach it without passing another such layer,
        and no layer that reaches the output comes after them.

        With a head that is the classifier. Without one (``num_classes=0``) it is the final block's last
        conv(s): the convs of earlier blocks also reach the output without passing a layer, through the
        identity shortcuts of the blocks after them, but they feed those blocks' convs.
        """
        outputs = [n for n in self.gm.graph.nodes if n.op == "output"]
        live: dict[fx.Node, bool] = {}  # reaches an output
        feeds_layer: dict[fx.Node, bool] = {}  # a layer that reaches an output comes after it
        for node in reversed(self.gm.graph.nodes):
            live[node] = node.op == "output" or any(live[u] for u in node.users)
            feeds_layer[node] = any((self.is_layer(u) and live[u]) or feeds_layer[u] for u in node.users)
        return [n for n in self._frontier(outputs, forward=False) if not feeds_layer[n]]

    def _placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def _frontier(self, starts: list[fx.Node], forward: bool) -> list[fx.Node]:
        seen: dict[fx.Node, None] = {}
        found: dict[fx.Node, None] = {}
        todo = list(starts)
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen[node] = None
            if self.is_layer(node) and node not in starts:
                found[node] = None
                continue
            todo.extend(node.users if forward else node.all_input_nodes)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return sorted(found, key=order.__getitem__)

    def ancestors(self, node: fx.Node) -> dict[fx.Node, None]:
        seen: dict[fx.Node, None] = {}
        todo = list(node.all_input_nodes)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen[n] = None
                todo.extend(n.all_input_nodes)
        return seen

    def is_shortcut_1x1(self, node: fx.Node) -> bool:
        """A 1x1 conv on a residual shortcut: its output (through pass-through ops) is added to a branch
        that starts from the same tensor as the conv's input and does not pass through the conv."""
        conv = self.module(node)
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1) or not node.args:
            return False
        start = self.source(node.args[0])
        out = node
        while len(out.users) == 1 and self.is_pass_through(next(iter(out.users))):
            out = next(iter(out.users))
        for add in out.users:
            if not self.is_add(add):
                continue
            for other in add.all_input_nodes:
                if other is out:
                    continue
                before = self.ancestors(other)
                if (start is other or start in before) and node not in before:
                    return True
        return False

    def is_se(self, node: fx.Node, depth: int = 6) -> bool:
        """A conv of a squeeze-and-excitation gate or of split attention: globally pooled input and a sigmoid
        or softmax gate after."""
        return self._reaches(node, forward=False, depth=depth, goal=self.is_global_pool) and self._reaches(
            node, forward=True, depth=depth, goal=self.is_gate
        )

    def _reaches(self, node: fx.Node, forward: bool, depth: int, goal) -> bool:
        frontier = [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for m in n.users if forward else n.all_input_nodes:
                    if goal(m):
                        return True
                    if self.is_pass_through(m) or self.is_activation(m) or self.is_conv(m) or m.op == "call_method":
                        nxt.append(m)
            frontier = nxt
        return False
