"""Graph rewrites around binary convolutions: activations that feed them, and Bi-Real shortcuts.

A sign after a ReLU is +1 everywhere, so a ReLU-family activation whose output reaches a binary conv
(directly or through BatchNorm, pooling, padding or dropout) is replaced on that path by a
``Hardtanh`` (ReCU's and Bi-Real Net's activation), an identity or a PReLU. Consumers that do not
reach a binary conv (a residual shortcut, a float 1x1 downsample, the head) keep the original
activation: the activation is split, and the pass-through ops between it and the binary conv are
cloned onto the binary path.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from binarize.graph import GraphFacts, is_fused_norm_act
from binarize.nn.shortcut import BiRealShortcut

__all__ = ["rewrite_activations", "add_bireal_shortcuts", "sign_input_module"]

_OUT_OF_PLACE = {torch.relu_: torch.relu, F.relu_: F.relu, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu}


def sign_input_module(kind: str, channels: int) -> nn.Module | None:
    """The module that replaces a ReLU-family activation in front of a sign (None for ``identity``)."""
    if kind == "hardtanh":
        return nn.Hardtanh()
    if kind == "prelu":
        return nn.PReLU(channels, init=0.25)
    return None


def _channels(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) > 1 else 1


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
    act_name = f"{target}_act"
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


def _binary_side(gm: fx.GraphModule, act: fx.Node, kind: str, made: dict, fused: set[str]) -> fx.Node:
    """The node that feeds binary convs instead of the activation node ``act``.

    For a fused norm-act module, already split by :func:`_split_fused`, the module's own output is
    the pre-activation value.
    """
    if act in made:
        return made[act]
    if act.op == "call_module" and act.target in fused:
        pre = anchor = act
    else:
        pre = act.args[0] if act.args else act.kwargs["input"]
        anchor = None
    _make_out_of_place(gm, act)
    replacement = sign_input_module(kind, _channels(pre))
    if replacement is None:
        made[act] = pre
        return pre
    if act.op == "call_module":
        name = f"{act.target}_sign_input"
    else:
        name = f"{act.name}_sign_input"
    gm.add_submodule(name, replacement)
    ctx = gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before(act)
    with ctx:
        node = gm.graph.call_module(name, (pre,))
    node.meta = dict(pre.meta)
    made[act] = node
    return node


def rewrite_activations(gm: fx.GraphModule, facts: GraphFacts, binary: list[str], kind: str) -> list[str]:
    """Replaces, on the path to each binary conv, the ReLU-family activation that feeds it.

    Args:
        gm: The traced model (modified in place).
        facts: Its :class:`~binarize.graph.GraphFacts`.
        binary: Qualified names of the convs that become binary.
        kind: ``hardtanh``, ``identity``, ``prelu`` or ``keep`` (no change).

    Returns:
        The names of the activations that were replaced (for the report).
    """
    if kind == "keep":
        return []
    wanted = set(binary)
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted]
    chains = []
    for conv in convs:
        chain, node = [], conv.args[0]
        while facts.is_pass_through(node):
            chain.append(node)
            node = node.args[0]
        if facts.is_activation(node):
            chains.append((conv, chain, node))
    made: dict[fx.Node, fx.Node] = {}
    clones: dict[fx.Node, fx.Node] = {}
    touched: list[fx.Node] = []
    fused = {
        str(act.target) for _, _, act in chains if act.op == "call_module" and is_fused_norm_act(facts.module(act))
    }
    for target in sorted(fused):
        touched.extend(_split_fused(gm, facts, target))
    for conv, chain, act in chains:
        src = _binary_side(gm, act, kind, made, fused)
        for original in reversed(chain):
            if original not in clones:
                with gm.graph.inserting_before(original):
                    clones[original] = gm.graph.node_copy(
                        original, lambda n, o=original, s=src: s if n is o.args[0] else n
                    )
            src = clones[original]
        touched.extend([*chain, act])
        conv.replace_input_with(conv.args[0], src)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    erased = set()
    for node in sorted(dict.fromkeys(touched), key=order.__getitem__, reverse=True):
        if not node.users:  # users come after producers: erase the dead float path back to front
            gm.graph.erase_node(node)
            erased.add(node)
    for original, clone in clones.items():
        if original not in erased and clone.op == "call_module":
            _own_module(gm, clone)
    return list(dict.fromkeys(str(act.target) if act.op == "call_module" else act.name for act in made))


def _own_module(gm: fx.GraphModule, clone: fx.Node) -> None:
    """Gives a cloned call of a module with state (a BatchNorm) its own copy of the module: the float path
    still calls the original, and one module called on both paths would average their statistics."""
    module = gm.get_submodule(clone.target)
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        return
    name = f"{clone.target}_binary_path"
    gm.add_submodule(name, copy.deepcopy(module))
    clone.target = name


def add_bireal_shortcuts(
    gm: fx.GraphModule, facts: GraphFacts, binary: list[str], in_shapes: dict[str, tuple], mode: str
) -> dict[str, str]:
    """Adds a real-valued shortcut from each binary conv's input to the output of its BatchNorm.

    Args:
        gm: The traced model (modified in place).
        facts: Its :class:`~binarize.graph.GraphFacts`.
        binary: Qualified names of the binary convs.
        in_shapes: Input and output shape of each conv, ``name -> (in_shape, out_shape)``.
        mode: ``avgpool_conv`` or ``zero_pad`` for shortcuts whose shapes differ.

    Returns:
        ``conv name -> shortcut module name`` for the shortcuts added; convs whose output shape is
        not their input shape divided by the stride get none.
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
        out = conv_node
        users = list(out.users)
        if len(users) == 1 and isinstance(facts.module(users[0]), nn.modules.batchnorm._BatchNorm):
            out = users[0]
        name = f"{conv_node.target}_shortcut"
        gm.add_submodule(name, BiRealShortcut(c_in, c_out, stride, mode))
        with gm.graph.inserting_after(out):
            shortcut = gm.graph.call_module(name, (conv_node.args[0],))
        with gm.graph.inserting_after(shortcut):
            total = gm.graph.call_function(operator.add, (out, shortcut))
        out.replace_all_uses_with(total, delete_user_cb=lambda user, t=total: user is not t)
        added[str(conv_node.target)] = name
    return added
