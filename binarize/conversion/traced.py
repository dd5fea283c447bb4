"""The traced path: decisions from the data flow of a torch.fx graph, then the graph rewrites.

facts (:class:`~binarize.conversion.graph.GraphFacts`: first convs, last layers, 1x1 shortcuts, SE convs)
-> a decision per layer -> activations feeding binary convs rewritten -> convs swapped for
:class:`~binarize.nn.ReCUConv2d` -> optional Bi-Real shortcuts -> the graph recompiled.
"""

from __future__ import annotations

from torch import fx, nn

from binarize.conversion.graph import GraphFacts
from binarize.conversion.layers import (
    Converted,
    cfg_names,
    decide_layers,
    layer_facts,
    layer_modules,
    swap_binary_layers,
    under,
)
from binarize.conversion.policy import Decision, Policy
from binarize.conversion.rewrite import add_bireal_shortcuts, rewrite_activations
from binarize.conversion.trace import node_shape
from binarize.nn import LayerOptions
from binarize.nn.shortcut import BiRealShortcut

__all__ = ["convert_traced"]


def _not_in_graph(gm: fx.GraphModule, name: str, called: set[str]) -> str:
    """Why a layer that no graph node calls cannot be binarized: the pass cannot see its inputs."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        leaf = ".".join(parts[:i])
        if leaf in called:
            return f"inside {type(gm.get_submodule(leaf)).__name__}, which torch.fx does not trace into"
    return "not called in the traced graph"


def _decide(gm: fx.GraphModule, facts: GraphFacts, policy: Policy, model: nn.Module) -> dict[str, Decision]:
    first = [str(n.target) for n in facts.first_convs()] + cfg_names(model, "first_conv")
    last = [str(n.target) for n in facts.last_layers()] + cfg_names(model, "classifier")
    shortcut = {str(n.target) for n in facts.layer_nodes() if facts.is_shortcut_1x1(n)}
    se = {str(n.target) for n in facts.layer_nodes() if facts.is_conv(n) and facts.is_se(n)}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    layers = []
    for name, module in layer_modules(gm):
        flags = {
            "is_first": under(name, first),
            "is_last": under(name, last),
            "is_shortcut_1x1": name in shortcut,
            "is_se": name in se,
        }
        # A conv inside a leaf module (timm's no-trace list, a registered leaf) has inputs the pass cannot
        # see: the activation feeding it could not be rewritten, nor its role (shortcut, SE) recognised.
        unsupported = None if name in called else _not_in_graph(gm, name, called)
        layers.append(layer_facts(name, module, unsupported, **flags))
    return decide_layers(policy, layers)


def convert_traced(gm: fx.GraphModule, model: nn.Module, policy: Policy, options: LayerOptions) -> Converted:
    """Converts a traced, shape-propagated model in place.

    Args:
        gm: The traced copy of the model (:func:`~binarize.conversion.trace.propagate_shapes` has run).
        model: The model it was traced from (its timm ``pretrained_cfg`` names the first conv and head).
        policy: What to binarize.
        options: The options of the binary layers.
    """
    facts = GraphFacts(gm)
    decisions = _decide(gm, facts, policy, model)
    binary = [name for name, d in decisions.items() if d.binary]
    downsamples = frozenset()  # found before the activations are rewritten, which hides the data flow
    if policy.shortcuts == "bireal" and policy.shortcut_downsample == "shared":
        downsamples = frozenset(
            str(n.target) for n in facts.layer_nodes() if n.target not in binary and facts.is_shortcut_1x1(n)
        )
    shapes = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in decisions and node.args:
            shapes[str(node.target)] = (node_shape(node.args[0]), node_shape(node))
    replaced = rewrite_activations(gm, facts, binary, policy.activation)
    swap_binary_layers(gm, decisions, options)
    facts.modules = dict(gm.named_modules())
    shortcuts = {}
    if policy.shortcuts == "bireal":
        shortcuts = add_bireal_shortcuts(gm, facts, binary, shapes, policy.shortcut_downsample, downsamples)
        for conv_name, sc_name in shortcuts.items():
            sc = gm.get_submodule(sc_name)
            if isinstance(sc, BiRealShortcut) and sc.conv is not None:
                decisions[f"{sc_name}.conv"] = Decision(False, f"Bi-Real shortcut of {conv_name}")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return Converted(gm, decisions, replaced, shortcuts)
