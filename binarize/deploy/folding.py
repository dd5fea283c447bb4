"""Folding and the packed model: a converted model in, an inference-only model on 1-bit weights out.

For each binary :class:`~binarize.nn.ReCUConv2d` the traced graph is searched for the BatchNorm that
consumes the conv's output alone (one user, called once). That BatchNorm's running statistics and affine
fold with the layer's ``alpha`` and bias into one per-channel multiplier and offset, computed in float64
(``m = alpha * gamma / sqrt(var + eps)``, ``c = (bias - mean) * gamma / sqrt(var + eps) + beta``, the
output transform of Larq Compute Engine, ``core/bconv2d/output_transform.h``), and the BatchNorm becomes
an identity. Anything else between the conv and its BatchNorm (a Bi-Real shortcut added before the norm,
a second consumer of the conv's output) blocks the fold: then only ``alpha`` and the bias are folded. An
untraced model (converted by module name) has no graph, so nothing but ``alpha`` and the bias is folded.

Optionally (``fold_float_bn``, on by default) a BatchNorm that consumes a float ``nn.Conv2d``'s output alone
is folded into that conv's weights and bias too, also in float64: the float results then differ from
the unfolded model by float32 rounding only (a few units in the last place), and the BatchNorm pass is gone.
The float convs the input reaches before any binary layer (the stem) are the exception: they keep their
BatchNorm, so everything up to the first binary layer computes what the converted model computes (bit
for bit where oneDNN sums an NCHW and a channels-last convolution in the same order, as on the machines
measured), and the first binary layer's signs are the same even where an input lies within float32
rounding of its threshold (with the stem folded, such ties flipped the prediction of 2 of 10,000 CIFAR-10
test images, docs/deploy.md).
"""

from __future__ import annotations

import collections
import copy
import types

import torch
from torch import fx, nn

from binarize._utils import replace_submodule, unwrap
from binarize.conversion.record import RECORD_ATTR, binarize_meta
from binarize.deploy import layer as _layer
from binarize.deploy.record import PACKED_ATTR, ExportError, PackedLayerRecord, PackedRecord
from binarize.errors import BinarizeError, TrainingError
from binarize.files import RUN_ATTR as _RUN_ATTR
from binarize.models import SOURCE_ATTR
from binarize.nn.conv import ReCUConv2d

__all__ = ["FoldedNorm", "build_shell", "channels_last_float_convs", "fold_plan", "make_inference_only", "pack"]

_CARRIED = (RECORD_ATTR, SOURCE_ATTR, _RUN_ATTR, PACKED_ATTR, "pretrained_cfg", "default_cfg", "num_classes")


class FoldedNorm(nn.Module):
    """What stays of a fused norm-activation layer (timm's ``BatchNormAct2d``) once its norm is folded:
    its dropout and its activation, under their own names."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _foldable_norm(module: nn.Module, channels: int) -> str | None:
    """Why ``module`` cannot be folded into a conv of ``channels`` outputs (None when it can)."""
    if not isinstance(module, nn.BatchNorm2d):
        return f"{type(module).__name__} follows, not a BatchNorm2d"
    fused = type(module).__name__ == "BatchNormAct2d" and hasattr(module, "drop") and hasattr(module, "act")
    if type(module) is not nn.BatchNorm2d and not fused:
        return f"{type(module).__name__} has a forward of its own"
    if module.running_mean is None or module.running_var is None:
        return "its BatchNorm keeps no running statistics"
    if module.num_features != channels:
        return f"its BatchNorm has {module.num_features} channels, not {channels}"
    return None


def _norm_remainder(module: nn.BatchNorm2d) -> nn.Module:
    return nn.Identity() if type(module) is nn.BatchNorm2d else FoldedNorm(module.drop, module.act)


def _sole_norm(node: fx.Node, modules: dict[str, nn.Module], calls: collections.Counter) -> tuple[str | None, str]:
    """The BatchNorm that alone consumes the output of the conv called at ``node``, or why there is none."""
    if calls[node.target] != 1:
        return None, "the conv is called more than once"
    users = list(node.users)
    if not users:
        return None, "its output is unused"
    names = ", ".join(u.name for u in users)
    if len(users) > 1:
        return None, f"its output feeds {len(users)} nodes ({names}), not a BatchNorm alone"
    user = users[0]
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None, f"{user.name} follows, not a BatchNorm2d"
    reason = _foldable_norm(modules[user.target], modules[node.target].out_channels)
    if reason is not None:
        return None, reason
    if calls[user.target] != 1:
        return None, f"{user.target} is called more than once"
    return str(user.target), ""


def _check_exportable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, ReCUConv2d) and not module.binarize_weights:
            raise ExportError(
                f"{name} binarizes activations only (binarize_weights off): train the weight stage, "
                "or convert with binary weights"
            )
        if _layer.is_packed_layer(module):
            raise ExportError(f"{name or 'the model'} is already packed: export the binarize training file instead")


def fold_plan(model: nn.Module, fold_float_bn: bool = True) -> PackedRecord:
    """What :func:`pack` folds in a converted model (the record it stores), without changing the model."""
    _check_exportable(model)
    binary = {name: m for name, m in model.named_modules() if isinstance(m, ReCUConv2d)}
    norms: dict[str, tuple[str | None, str]] = {name: (None, "the model was not traced") for name in binary}
    float_folds: dict[str, str] = {}
    if isinstance(model, fx.GraphModule):
        norms = {name: (None, "not called in the graph") for name in binary}
        modules = dict(model.named_modules())
        graph_calls = [n for n in model.graph.nodes if n.op == "call_module"]
        calls = collections.Counter(n.target for n in graph_calls)
        for node in graph_calls:
            module = modules[node.target]
            if isinstance(module, ReCUConv2d):
                norms[str(node.target)] = _sole_norm(node, modules, calls)
            elif fold_float_bn and type(module) is nn.Conv2d and _after_a_binary_layer(node, modules):
                norm, _ = _sole_norm(node, modules, calls)
                if norm is not None:
                    float_folds[str(node.target)] = norm
    layers = {
        name: PackedLayerRecord(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            activation_bias=conv.activation_bias is not None,
            norm=norms[name][0],
            note=norms[name][1],
        )
        for name, conv in binary.items()
    }
    return PackedRecord(layers=layers, float_folds=float_folds)


def _after_a_binary_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a binary conv computes any input of ``node``."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(modules[n.target], ReCUConv2d):
            return True
        todo.extend(n.all_input_nodes)
    return False


@torch.no_grad()
def _fold_into_float_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x))`` as one conv, computed in float64, stored in the conv's dtype."""
    f64 = torch.float64
    inv = bn.running_var.to(f64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        inv = inv * bn.weight.to(f64)
    bias = conv.bias.to(f64) if conv.bias is not None else torch.zeros_like(inv)
    bias = (bias - bn.running_mean.to(f64)) * inv
    if bn.bias is not None:
        bias = bias + bn.bias.to(f64)
    conv.weight.copy_(conv.weight.to(f64) * inv.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty_like(bias, dtype=conv.weight.dtype))
    conv.bias.copy_(bias)


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy that keeps binarize's attributes (a GraphModule's deepcopy drops attributes)."""
    clone = copy.deepcopy(model)
    for attr in _CARRIED:
        if hasattr(model, attr) and not hasattr(clone, attr):
            setattr(clone, attr, copy.deepcopy(getattr(model, attr)))
    return clone


def _refuse_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise TrainingError(
            "a packed model is inference-only: fine-tune the binarize training file (binarize finetune), "
            "then export it again"
        )
    return nn.Module.train(self, False)


def channels_last_float_convs(model: nn.Module) -> nn.Module:
    """Stores every float conv's weight channels-last, in place.

    The packed layers return channels-last (NHWC) outputs, which is what their kernel writes; a float conv
    that receives such an input with an NCHW weight falls back to a slow convolution path on CPU, so the
    float convs are given the layout of their inputs (ResNet-18 at 224 px, 1 thread: 81 -> 52 ms). The
    stem too: its NHWC output keeps the ops after it on their fast path (an NCHW stem: 24 -> 40 ms, the
    max-pool alone 0.6 -> 8.7 ms). The values are unchanged.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.weight.dim() == 4:
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def make_inference_only(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and ``.train()`` refused with a one-line :class:`TrainingError`."""
    model.requires_grad_(False)
    model.train = types.MethodType(_refuse_train, model)
    return model.eval()


def build_shell(model: nn.Module, record: PackedRecord) -> nn.Module:
    """Turns a converted model into the packed structure of ``record``, in place (the packed tensors unset).

    Each binary conv becomes an empty packed layer, each folded BatchNorm an identity (or a
    :class:`FoldedNorm`), and each float conv with a folded BatchNorm gets a bias. What :func:`load_packed`
    loads a packed file into.

    Raises:
        BinarizeError: The model's binary layers are not those of the record.
    """
    binary = [name for name, m in model.named_modules() if isinstance(m, ReCUConv2d)]
    if binary != list(record.layers):
        missing = sorted(set(record.layers) - set(binary)) or sorted(set(binary) - set(record.layers))
        raise BinarizeError(
            f"the model's binary layers differ from the packed file's ({len(binary)} vs {len(record.layers)}; "
            f"first difference: {missing[0] if missing else 'their order'})"
        )
    for name, entry in record.layers.items():
        replace_submodule(model, name, _layer.empty_layer(model.get_submodule(name)))
        if entry.norm is not None:
            replace_submodule(model, entry.norm, _norm_remainder(model.get_submodule(entry.norm)))
    for conv_name, norm_name in record.float_folds.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
        replace_submodule(model, norm_name, _norm_remainder(model.get_submodule(norm_name)))
    return model


@torch.no_grad()
def pack(model: nn.Module, *, fold_float_bn: bool = True) -> nn.Module:
    """The packed, inference-only copy of a converted model.

    Each binary conv becomes ``PackedBinaryConv2d.from_recu(conv, bn)`` with its BatchNorm folded where
    the graph allows it (see the module docstring); float layers stay float (float32). The result is in
    eval mode, holds no gradients and refuses ``.train()``; :func:`~binarize.deploy.record.packed_meta`
    gives its packing record.

    Args:
        model: A model returned by :func:`binarize.convert` or :func:`binarize.load`, not modified.
        fold_float_bn: Also fold BatchNorms into the float convs before them.

    Raises:
        ExportError: A binary layer has float weights (``binarize_weights`` off), or the model is packed.
        BinarizeError: ``model`` was not converted by binarize.
    """
    model = unwrap(model)
    if binarize_meta(model) is None:
        raise BinarizeError("pack() takes a model returned by binarize.convert() or binarize.load()")
    record = fold_plan(model, fold_float_bn)
    packed = _copy(model).float().eval()
    for name, entry in record.layers.items():
        norm = packed.get_submodule(entry.norm) if entry.norm is not None else None
        replace_submodule(packed, name, _layer.pack_layer(packed.get_submodule(name), norm))
        if norm is not None:
            replace_submodule(packed, entry.norm, _norm_remainder(norm))
    for conv_name, norm_name in record.float_folds.items():
        norm = packed.get_submodule(norm_name)
        _fold_into_float_conv(packed.get_submodule(conv_name), norm)
        replace_submodule(packed, norm_name, _norm_remainder(norm))
    setattr(packed, PACKED_ATTR, record)
    return make_inference_only(channels_last_float_convs(packed))
