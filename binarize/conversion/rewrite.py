"""Graph rewrites around binary convolutions: activations that feed them, and Bi-Real shortcuts.

A sign after a ReLU is +1 everywhere, so a ReLU-family activation whose output reaches a binary conv
is replaced on that path by a ``Hardtanh`` (ReCU's and Bi-Real Net's activation), an identity or a
PReLU. "Reaches" means directly or through ops that move or combine values without creating signs of
their own: BatchNorm, pooling, padding, dropout, concatenation, splits and indexing, reshapes, products
(a squeeze-and-excitation gate) and sums of such values. Consumers that do not reach a binary conv (a
residual shortcut, a float 1x1 downsample, the head) keep the original activation: the activation is
split, and the ops between it and the binary conv are cloned onto the binary path.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from binarize._utils import replace_submodule
from binarize.conversion.graph import GraphFacts, is_fused_norm_act
from binarize.conversion.trace import node_shape
from binarize.nn.shortcut import BiRealShortcut

__all__ = [
    "SIGN_INPUT_SUFFIX",
    "add_bireal_shortcuts",
    "replace_activation_module",
    "rewrite_activations",
    "sign_input_module",
]

SIGN_INPUT_SUFFIX = "_sign_input"
"""Suffix of the module put on the binary path in place of an activation (``act1`` -> ``act1_sign_input``)."""

_OUT_OF_PLACE = {torch.relu_: torch.relu, F.relu_: F.relu, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu}


def sign_input_module(kind: str, channels: int) -> nn.Module | None:
    """The module that replaces a ReLU-family activation in front of a sign (None for ``identity``)."""
    if kind == "hardtanh":
        return nn.Hardtanh()
    if kind == "prelu":
        return nn.PReLU(channels, init=0.25)
    return None


def replace_activation_module(root: nn.Module, name: str, kind: str, channels: int) -> None:
    """Replaces the activation module ``name`` of ``root`` (or the activation inside it, for a fused
    norm-act layer) by :func:`sign_input_module` (an identity for ``identity``), at every call of it."""
    new = sign_input_module(kind, channels) or nn.Identity()
    module = root.get_submodule(name)
    if is_fused_norm_act(module):
        module.act = new
    else:
        replace_submodule(root, name, new)


def _channels(node: fx.Node) -> int:
    shape = node_shape(node)
    return int(shape[1]) if shape is not None and len(shape) > 1 else 1


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name no submodule of ``gm`` has yet."""
    name, i = base, 0
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}_{i}"


def _site_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A name unique to one call site: the module's name, with ``#k`` (k-th call in graph order) when the
    module is called more than once; the node's name for functions and methods."""
    if node.op != "call_module":
        return node.name
    sites = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    return str(node.target) if len(sites) == 1 else f"{node.target}#{sites.index(node) + 1}"


def _make_out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place activation on the float path would modify a tensor the binary path saved."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for m in (module, getattr(module, "act", None)):
            if m is not None and getattr(m, "inplace", False):
                m.inplace = False
    elif node.op == "call_function":
        node.target = _OUT_OF_PLACE.get(node.target, node.target)
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and node.target == "relu_":
        node.target = "relu"


def _split_fused(gm: fx.GraphModule, facts: GraphFacts, target: str) -> list[fx.Node]:
    """Moves the activation out of a fused norm-act module, into a node after each of its calls."""
    module = gm.get_submodule(target)
    act = module.act
    if getattr(act, "inplace", False):
        act.inplace = False
    module.act = nn.Identity()
    act_name = _free_name(gm, f"{target}_act")
    gm.add_submodule(act_name, act)
    act_nodes = []
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]:
        with gm.graph.inserting_after(node):
            act_node = gm.graph.call_module(act_name, (node,))
        act_node.meta = dict(node.meta)
        node.replace_all_uses_with(act_node, delete_user_cb=lambda user, a=act_node: user is not a)
        act_nodes.append(act_node)
    facts.modules = dict(gm.named_modules())
    return act_nodes


def _binary_side(gm: fx.GraphModule, act: fx.Node, kind: str) -> fx.Node:
    """A new node that computes what feeds binary convs instead of the activation node ``act``."""
    pre = act.args[0] if act.args else act.kwargs["input"]
    _make_out_of_place(gm, act)
    replacement = sign_input_module(kind, _channels(pre))
    if replacement is None:
        return pre
    name = _free_name(gm, f"{act.target if act.op == 'call_module' else act.name}{SIGN_INPUT_SUFFIX}")
    gm.add_submodule(name, replacement)  # a module called at two sites gets a new module per site
    with gm.graph.inserting_before(act):
        node = gm.graph.call_module(name, (pre,))
    node.meta = dict(pre.meta)
    return node


class _BinaryPath:
    """Builds, for a node on the way into a binary conv, the node to use there instead.

    A ReLU-family activation is replaced; an op that only moves or combines values (pass-through,
    concatenation, split, indexing, reshape, a product such as a squeeze-and-excitation gate) is cloned
    with its inputs replaced, when one of them changed; a sum only when all its inputs changed (a sum of
    non-negative values is non-negative, a sum with anything else already has both signs). Every other
    node stays as it is. The float consumers keep the original nodes.
    """

    def __init__(self, gm: fx.GraphModule, facts: GraphFacts, kind: str) -> None:
        self.gm, self.facts, self.kind = gm, facts, kind
        self.memo: dict[fx.Node, fx.Node] = {}
        self.replaced: dict[fx.Node, str] = {}
        self.cloned: dict[fx.Node, fx.Node] = {}

    def _combines(self, node: fx.Node) -> bool:
        f = self.facts
        return f.is_pass_through(node) or f.is_structural(node) or f.is_product(node) or f.is_add(node)

    def activations(self, node: fx.Node, seen: dict[fx.Node, None]) -> list[fx.Node]:
        """The activations :meth:`node_for` would replace behind ``node`` (no graph change)."""
        if node in seen:
            return []
        seen[node] = None
        if self.facts.is_activation(node):
            return [node]
        if not self._combines(node):
            return []
        return [a for n in node.all_input_nodes for a in self.activations(n, seen)]

    def node_for(self, node: fx.Node) -> fx.Node:
        if node in self.memo:
            return self.memo[node]
        result = node
        if self.facts.is_activation(node):
            self.replaced[node] = _site_name(self.gm, node)
            result = _binary_side(self.gm, node, self.kind)
        elif self._combines(node):
            inputs = node.all_input_nodes
            new = {n: self.node_for(n) for n in inputs}
            changed = [n for n in inputs if new[n] is not n]
            if changed and (len(changed) == len(inputs) or not self.facts.is_add(node)):
                with self.gm.graph.inserting_before(node):
                    result = self.gm.graph.node_copy(node, lambda n: new.get(n, n))
                result.target = _OUT_OF_PLACE_OPS.get(result.target, result.target)
                self.cloned[node] = result
        self.memo[node] = result
        return result


_OUT_OF_PLACE_OPS = {operator.iadd: operator.add, operator.imul: operator.mul, "add_": "add", "mul_": "mul"}


def rewrite_activations(gm: fx.GraphModule, facts: GraphFacts, binary: list[str], kind: str) -> list[str]:
    """Replaces, on the paths into each binary conv, the ReLU-family activations that feed it.

    Args:
        gm: The traced model (modified in place).
        facts: Its :class:`~binarize.conversion.graph.GraphFacts`.
        binary: Qualified names of the convs that become binary.
        kind: ``hardtanh``, ``identity``, ``prelu`` or ``keep`` (no change).

    Returns:
        The activation call sites that were replaced (for the report), one name per site: the module's
        name (``layer1.0.relu#2`` for its second call when it is called more than once) or the
        function call's node name.
    """
    if kind == "keep":
        return []
    wanted = set(binary)
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted and n.args]
    path = _BinaryPath(gm, facts, kind)
    seen: dict[fx.Node, None] = {}
    reached = [a for conv in convs for a in path.activations(conv.args[0], seen)]
    fused = {str(a.target) for a in reached if a.op == "call_module" and is_fused_norm_act(facts.module(a))}
    touched: list[fx.Node] = []
    for target in sorted(fused):  # their activation becomes a node of its own, which node_for replaces
        touched.extend(_split_fused(gm, facts, target))
    for conv in convs:
        conv.replace_input_with(conv.args[0], path.node_for(conv.args[0]))
    touched += [*path.replaced, *path.cloned]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    erased = set()
    for node in sorted(dict.fromkeys(touched), key=order.__getitem__, reverse=True):
        if not node.users:  # users come after producers: erase the dead float path back to front
            gm.graph.erase_node(node)
            erased.add(node)
    for original, clone in path.cloned.items():
        if original not in erased and clone.op == "call_module":
            _own_module(gm, clone)
    return list(path.replaced.values())


def _own_module(gm: fx.GraphModule, clone: fx.Node) -> None:
    """Gives a cloned call of a module with state (a BatchNorm) its own copy of the module: the float path
    still calls the original, and one module called on both paths would average their statistics."""
    module = gm.get_submodule(clone.target)
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        return
    name = _free_name(gm, f"{clone.target}_binary_path")
    gm.add_submodule(name, copy.deepcopy(module))
    clone.target = name


def add_bireal_shortcuts(
    gm: fx.GraphModule,
    facts: GraphFacts,
    binary: list[str],
    in_shapes: dict[str, tuple],
    mode: str,
    downsamples: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Adds a real-valued shortcut from each binary conv's input to the output of its BatchNorm.

    Args:
        gm: The traced model (modified in place).
        facts: Its :class:`~binarize.conversion.graph.GraphFacts`.
        binary: Qualified names of the binary convs.
        in_shapes: Input and output shape of each conv, ``name -> (in_shape, out_shape)``.
        mode: ``avgpool_conv``, ``zero_pad`` or ``shared`` for shortcuts whose shapes differ.
        downsamples: For ``shared``: the float 1x1 convs on residual shortcuts (found before the
            activations were rewritten), the candidates for reuse.

    Returns:
        ``conv name -> shortcut module name`` for the shortcuts added (for ``shared``, the block's
        downsample module whose output is reused); convs whose output shape is not their input shape
        divided by the stride get none.
    """
    added = {}
    wanted = set(binary)
    for conv_node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted]:
        conv = gm.get_submodule(conv_node.target)
        (n_in, c_in, h_in, w_in), (_, c_out, h_out, w_out) = in_shapes[conv_node.target]
        stride = conv.stride[0]
        if conv.stride[0] != conv.stride[1] or (-(-h_in // stride), -(-w_in // stride)) != (h_out, w_out):
            continue
        if mode == "zero_pad" and c_out < c_in:
            continue
        out = _norm_output(facts, conv_node)
        reshaping = stride > 1 or c_in != c_out
        shared = _block_downsample(gm, facts, conv_node, out, downsamples) if mode == "shared" and reshaping else None
        if shared is not None:
            shortcut, name = shared, str(shared.target)
        else:
            name = _free_name(gm, f"{conv_node.target}_shortcut")
            build_mode = "avgpool_conv" if mode == "shared" else mode
            gm.add_submodule(name, BiRealShortcut(c_in, c_out, stride, build_mode))
            with gm.graph.inserting_after(out):
                shortcut = gm.graph.call_module(name, (conv_node.args[0],))
        with gm.graph.inserting_after(shortcut):
            total = gm.graph.call_function(operator.add, (out, shortcut))
        out.replace_all_uses_with(total, delete_user_cb=lambda user, t=total: user is not t)
        added[str(conv_node.target)] = name
    return added


def _norm_output(facts: GraphFacts, conv_node: fx.Node) -> fx.Node:
    """The conv's BatchNorm when the conv feeds only that, else the conv itself."""
    users = list(conv_node.users)
    if len(users) == 1 and isinstance(facts.module(users[0]), nn.modules.batchnorm._BatchNorm):
        return users[0]
    return conv_node


def _root(facts: GraphFacts, node: fx.Node) -> fx.Node:
    """Walks back through pass-through ops and activations (the binary path's sign-input replacement
    included) to the tensor both paths of a block start from."""
    while (facts.is_pass_through(node) or facts.is_activation(node) or _is_sign_input(node)) and node.args:
        if not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _is_sign_input(node: fx.Node) -> bool:
    return node.op == "call_module" and SIGN_INPUT_SUFFIX in str(node.target)


def _block_downsample(
    gm: fx.GraphModule, facts: GraphFacts, conv_node: fx.Node, out: fx.Node, downsamples: frozenset[str]
) -> fx.Node | None:
    """The output node of the block's float 1x1 downsample (conv, then its BatchNorm) that starts from the
    binary conv's input and has its output's shape; moved just after ``out`` when it came later.

    ReCU's and Bi-Real Net's ImageNet ResNets compute one downsample per block and use it as the first
    conv's shortcut; torchvision's blocks have that module already, so no second 1x1 conv is added.
    """
    start, shape = _root(facts, conv_node.args[0]), node_shape(out)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in downsamples:
            continue
        ds_out = _norm_output(facts, node)
        if _root(facts, node.args[0]) is not start or shape is None or node_shape(ds_out) != shape:
            continue
        if order[ds_out] > order[out]:
            if any(order[i] > order[out] for i in node.all_input_nodes):
                continue
            out.append(node)
            if ds_out is not node:
                node.append(ds_out)
        return ds_out
    return None
