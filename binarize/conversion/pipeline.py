"""The conversion pass: a float model in, a binary model out.

``convert`` = copy -> trace -> propagate shapes -> decide per layer (:mod:`binarize.conversion.policy`) ->
rewrite the activations that feed binary convs -> swap convs for :class:`~binarize.nn.ReCUConv2d`
-> optional Bi-Real shortcuts -> record what was done (:mod:`binarize.conversion.record`). A model that
cannot be traced is converted by swapping modules by name instead (``traced: false`` in the report).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from binarize._utils import default_example_inputs, eval_mode, replace_submodule, set_preserved_attr, unwrap
from binarize.conversion.graph import GraphFacts, is_activation_module, is_fused_norm_act
from binarize.conversion.policy import Decision, LayerFacts, Policy, check_rules_match, decide
from binarize.conversion.record import ConversionRecord, LayerRecord, binarize_meta, set_record
from binarize.conversion.rewrite import add_bireal_shortcuts, rewrite_activations, sign_input_module
from binarize.conversion.trace import propagate_shapes, trace
from binarize.nn import LayerOptions, ReCUConv2d

__all__ = ["convert", "recalibrate_bn", "binarize_meta", "effective_weight"]

_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "binarize_source")
_STD_CONV_NAMES = ("StdConv2d", "ScaledStdConv2d")


def effective_weight(conv: nn.Conv2d) -> tuple[torch.Tensor | None, str | None]:
    """The float weight a conv applies, and why it cannot be binarized (None when it can).

    Plain ``nn.Conv2d`` applies its ``weight``; timm's weight-standardised convs (``StdConv2d``,
    ``ScaledStdConv2d``) apply a standardised copy, computed here. Other subclasses run a forward of
    their own (dynamic padding, for one) that a binary conv would not reproduce.
    """
    if isinstance(conv, ReCUConv2d):
        return None, None
    name = type(conv).__name__
    if type(conv) is not nn.Conv2d and name not in _STD_CONV_NAMES:
        return None, f"{name} has a forward of its own"
    reason = ReCUConv2d.unsupported_reason(conv)
    if reason is not None or name not in _STD_CONV_NAMES:
        return None, reason
    with torch.no_grad():
        w = conv.weight.float().flatten(1)
        var, mean = torch.var_mean(w, dim=1, keepdim=True, correction=0)
        w = (w - mean) * torch.rsqrt(var + conv.eps)
        if hasattr(conv, "gain"):
            w = w * (conv.gain.flatten(1) * conv.scale)
    return w.reshape(conv.weight.shape).to(conv.weight.dtype), None


def _cfg_names(model: nn.Module, key: str) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    value = cfg.get(key)
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer_facts(name: str, module: nn.Module, unsupported: str | None = None, **flags) -> LayerFacts:
    is_conv = isinstance(module, nn.Conv2d)
    if is_conv and unsupported is None:
        unsupported = effective_weight(module)[1]
    return LayerFacts(
        name=name,
        type_names=tuple(c.__name__ for c in type(module).__mro__),
        op="conv" if is_conv else "linear",
        in_channels=module.in_channels if is_conv else module.in_features,
        groups=module.groups if is_conv else 1,
        unsupported=unsupported,
        **flags,
    )


def _binarize_layers(root: nn.Module, decisions: dict[str, Decision], options: LayerOptions) -> None:
    for name, decision in decisions.items():
        conv = root.get_submodule(name)
        if decision.binary and not isinstance(conv, ReCUConv2d):
            weight, _ = effective_weight(conv)
            replace_submodule(root, name, ReCUConv2d.from_float(conv, weight, options))


def _not_in_graph(gm: fx.GraphModule, name: str, called: set[str]) -> str:
    """Why a layer that no graph node calls cannot be binarized: the pass cannot see its inputs."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        leaf = ".".join(parts[:i])
        if leaf in called:
            return f"inside {type(gm.get_submodule(leaf)).__name__}, which torch.fx does not trace into"
    return "not called in the traced graph"


def _decide_traced(gm: fx.GraphModule, facts: GraphFacts, policy: Policy, model: nn.Module) -> dict[str, Decision]:
    first = [str(n.target) for n in facts.first_convs()] + _cfg_names(model, "first_conv")
    last = [str(n.target) for n in facts.last_layers()] + _cfg_names(model, "classifier")
    shortcut = {str(n.target) for n in facts.layer_nodes() if facts.is_shortcut_1x1(n)}
    se = {str(n.target) for n in facts.layer_nodes() if facts.is_conv(n) and facts.is_se(n)}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    layers = []
    for name, module in gm.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            flags = {
                "is_first": _under(name, first),
                "is_last": _under(name, last),
                "is_shortcut_1x1": name in shortcut,
                "is_se": name in se,
            }
            # A conv inside a leaf module (timm's no-trace list) has inputs the pass cannot see: the
            # activation feeding it could not be rewritten, nor its role (shortcut, SE) recognised.
            unsupported = None if name in called else _not_in_graph(gm, name, called)
            layers.append(_layer_facts(name, module, unsupported, **flags))
    check_rules_match(policy, layers)
    return {f.name: decide(policy, f) for f in layers}


def _convert_traced(
    gm: fx.GraphModule, policy: Policy, options: LayerOptions, model: nn.Module
) -> tuple[nn.Module, dict]:
    facts = GraphFacts(gm)
    decisions = _decide_traced(gm, facts, policy, model)
    binary = [name for name, d in decisions.items() if d.binary]
    shapes = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in decisions and node.args:
            shapes[str(node.target)] = (_shape(node.args[0]), _shape(node))
    replaced = rewrite_activations(gm, facts, binary, policy.activation)
    _binarize_layers(gm, decisions, options)
    facts.modules = dict(gm.named_modules())
    shortcuts = {}
    if policy.shortcuts == "bireal":
        shortcuts = add_bireal_shortcuts(gm, facts, binary, shapes, policy.shortcut_downsample)
        for conv_name, sc_name in shortcuts.items():
            sc = gm.get_submodule(sc_name)
            if sc.conv is not None:
                decisions[f"{sc_name}.conv"] = Decision(False, f"Bi-Real shortcut of {conv_name}")
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    notes = {"activations_replaced": replaced, "shortcuts": shortcuts}
    return gm, {"decisions": decisions, **notes}


def _shape(node) -> list[int] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return list(meta.shape) if getattr(meta, "shape", None) is not None else None


@torch.no_grad()
def _record_calls(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[tuple]:
    """Runs the model once with hooks: (name, module, input tensor, output tensor) per module call."""
    calls, handles = [], []

    def hook(name):
        return lambda m, args, out: calls.append((name, m, args[0] if args else None, out))

    for name, m in model.named_modules():
        if name and not list(m.children()) or is_fused_norm_act(m) or isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _convert_untraced(
    model: nn.Module, policy: Policy, options: LayerOptions, example_inputs: Sequence[torch.Tensor]
) -> tuple[nn.Module, dict]:
    """Conversion by module name, for models that torch.fx cannot trace."""
    calls = _record_calls(model, example_inputs)
    layer_calls = [c for c in calls if isinstance(c[1], (nn.Conv2d, nn.Linear))]
    first = ([layer_calls[0][0]] if layer_calls else []) + _cfg_names(model, "first_conv")
    last = ([layer_calls[-1][0]] if layer_calls else []) + _cfg_names(model, "classifier")
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            is_conv = isinstance(module, nn.Conv2d)
            parts = name.split(".")
            flags = {
                "is_first": _under(name, first),
                "is_last": _under(name, last),
                "is_shortcut_1x1": is_conv
                and tuple(module.kernel_size) == (1, 1)
                and any(p in ("downsample", "shortcut", "skip") for p in parts),
                "is_se": any(p in ("se", "squeeze_excite") for p in parts),
            }
            layers.append(_layer_facts(name, module, **flags))
    check_rules_match(policy, layers)
    decisions = {f.name: decide(policy, f) for f in layers}
    producer = {id(out): (name, m, inp) for name, m, inp, out in calls if isinstance(out, torch.Tensor)}
    replaced = []
    binary_names = {n for n, d in decisions.items() if d.binary}
    for name, _, inp, _ in layer_calls:
        if name not in binary_names or not isinstance(inp, torch.Tensor):
            continue
        found = producer.get(id(inp))
        while found is not None and not (is_activation_module(found[1]) or is_fused_norm_act(found[1])):
            if not isinstance(found[1], (nn.modules.batchnorm._BatchNorm, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)):
                found = None
                break
            found = producer.get(id(found[2]))
        if found is None or found[0] in replaced or policy.activation == "keep":
            continue
        act_name, act, _ = found
        channels = inp.shape[1] if inp.dim() > 1 else 1
        new = sign_input_module(policy.activation, channels) or nn.Identity()
        if is_fused_norm_act(act):
            act.act = new
        else:
            replace_submodule(model, act_name, new)
        replaced.append(act_name)
    _binarize_layers(model, decisions, options)
    return model, {"decisions": decisions, "activations_replaced": replaced, "shortcuts": {}}


def convert(
    model: nn.Module,
    policy: Policy | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    layer: LayerOptions | None = None,
) -> nn.Module:
    """Converts a float model into a ReCU binary model.

    The input model is not modified. Eligible convolutions become :class:`binarize.nn.ReCUConv2d`
    (1-bit weights and activations); the policy says which stay float and why. Run
    :func:`recalibrate_bn` on a few batches before evaluating the result.

    Args:
        model: Any ``nn.Module`` (timm, torchvision or your own).
        policy: What to binarize; :class:`~binarize.Policy` defaults when omitted.
        example_inputs: A tuple of input tensors, as ``torch.export`` takes them (or one tensor); one zero
            image of the model's timm input size (else 3x224x224) when omitted. Used to trace shapes and
            count MACs.
        layer: Options of the binary layers (weight binarization, activation bias, initial tau);
            :class:`~binarize.nn.LayerOptions` defaults when omitted.

    Returns:
        A new module (a ``torch.fx.GraphModule`` when the model traces) carrying its
        :class:`~binarize.conversion.record.ConversionRecord` (:func:`binarize_meta` reads it), which
        :func:`binarize.inspect` and :func:`binarize.save` use.

    Example::

        >>> import torchvision
        >>> binary = convert(torchvision.models.resnet18(num_classes=10))
        >>> type(binary.layer1[0].conv1).__name__
        'ReCUConv2d'
    """
    policy = policy if policy is not None else Policy()
    layer = layer if layer is not None else LayerOptions()
    source = unwrap(model)
    model = copy.deepcopy(source)
    if isinstance(example_inputs, torch.Tensor):  # one tensor, not a tuple: tuple() would split its batch
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    trace_error = None
    try:
        gm = trace(model)
        propagate_shapes(gm, example_inputs)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: convert without a graph
        gm, trace_error = None, f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if gm is not None:
        result, info = _convert_traced(gm, policy, layer, model)
    else:
        result, info = _convert_untraced(model, policy, layer, example_inputs)
    for attr in _CARRIED_ATTRS:
        if hasattr(source, attr):
            set_preserved_attr(result, attr, copy.deepcopy(getattr(source, attr)))
    decisions = info["decisions"]
    record = ConversionRecord(
        policy=policy,
        layer=layer,
        input_size=tuple(int(v) for v in example_inputs[0].shape[1:]),
        traced=gm is not None,
        trace_error=trace_error,
        layers={
            name: LayerRecord("binary" if d.binary else "float", d.reason, name in info.get("guessed", ()))
            for name, d in decisions.items()
        },
        activations_replaced=tuple(info["activations_replaced"]),
        shortcuts=dict(info["shortcuts"]),
    )
    set_record(result, record)
    return result


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> nn.Module:
    """Re-estimates every BatchNorm's running statistics from data, in place.

    Binarizing changes the distribution of every binary conv's output, so the float model's running
    statistics no longer fit; evaluate a freshly converted model only after this. The statistics are
    reset and re-accumulated as an exact average over the batches; nothing else is trained, dropout
    stays off, and the model's train/eval mode is restored.

    Args:
        model: The model (modified in place).
        batches: An iterable of input tensors, or of ``(inputs, targets, ...)`` tuples or lists.
        max_batches: Stop after this many batches.

    Returns:
        The model.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    with eval_mode(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.training = True  # only the norm itself: its children (timm's fused act, drop) stay in eval
        try:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device, non_blocking=True))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
    return model
