"""Open registries: what binarize knows about module types, and how a user teaches it more.

Three registries, filled with decorators in timm's style (``timm.layers.register_notrace_module``):

* :func:`register_binarizable`: float conv classes that can become a :class:`~binarize.nn.ReCUConv2d`,
  each with the function computing the weight it applies (timm's weight-standardised ``StdConv2d``
  applies a standardised copy of its ``weight``). ``nn.Conv2d`` applies its ``weight`` as it is. A
  class is looked up exactly: a subclass of a registered class has a forward of its own until it is
  registered too.
* :func:`register_leaf_module`: module classes the tracer does not trace into (binarize's own layers;
  timm's no-trace modules are read from timm). ``binarize.convert(..., leaf_modules=...)`` adds
  classes for one call.
* :func:`register_activation`: ReLU-like activations (module classes, functions or tensor method
  names), whose output must not feed a sign directly (a sign after a ReLU is +1 everywhere). A
  registered class is also a leaf, so that the traced graph shows it; a registered Python function is
  wrapped by the tracer (recorded as one call) for the same reason. Module classes match by
  ``isinstance``.

binarize never imports timm: timm's classes are registered the first time a registry is read while
timm is loaded (which it is for any timm model).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from binarize.errors import ConfigError
from binarize.nn.conv import ReCUConv2d
from binarize.nn.shortcut import BiRealShortcut

__all__ = [
    "EffectiveWeight",
    "activation_functions",
    "activation_methods",
    "activation_types",
    "binarizable_weight",
    "import_class",
    "is_binarizable",
    "leaf_types",
    "qualified_name",
    "register_activation",
    "register_binarizable",
    "register_leaf_module",
    "standardised_weight",
    "tracer_functions",
]

EffectiveWeight = Callable[[nn.Conv2d], torch.Tensor]
"""``fn(conv) -> weight``: the float weight a conv applies, of the shape of ``conv.weight``."""

ModuleType = TypeVar("ModuleType", bound=type)
Activation = TypeVar("Activation", type, Callable, str)

_BINARIZABLE: dict[type, EffectiveWeight | None] = {nn.Conv2d: None}
_LEAVES: dict[type, None] = dict.fromkeys((ReCUConv2d, BiRealShortcut))
_ACTIVATION_TYPES: dict[type, None] = dict.fromkeys(
    (nn.ReLU, nn.ReLU6, nn.RReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU,
     nn.Softplus)
)  # fmt: skip
_ACTIVATION_FUNCTIONS: dict[Callable, None] = dict.fromkeys(
    (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.rrelu, F.rrelu_, F.silu, F.gelu, F.leaky_relu,
     F.leaky_relu_, F.hardswish, F.mish, F.elu, F.elu_, F.celu, F.selu, F.softplus)
)  # fmt: skip
_ACTIVATION_METHODS: dict[str, None] = dict.fromkeys(("relu", "relu_"))
_timm_registered = False


def standardised_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight of timm's ``StdConv2d`` / ``ScaledStdConv2d``: each output filter standardised,
    ``(W - mean) / sqrt(var + eps)``, times ``gain * scale`` where the conv has a gain (NF-Nets)."""
    w = conv.weight.float().flatten(1)
    var, mean = torch.var_mean(w, dim=1, keepdim=True, correction=0)
    w = (w - mean) * torch.rsqrt(var + conv.eps)
    if hasattr(conv, "gain"):
        w = w * (conv.gain.flatten(1) * conv.scale)
    return w.reshape(conv.weight.shape).to(conv.weight.dtype)


def _register_timm() -> None:
    """timm's binarizable convs and activation classes (the no-trace modules are timm's own registry)."""
    from timm import layers

    for name in ("StdConv2d", "ScaledStdConv2d"):
        if isinstance(getattr(layers, name, None), type):
            _BINARIZABLE[getattr(layers, name)] = standardised_weight
    names = ("Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "HardMish", "HardMishMe", "GELU",
             "GELUTanh", "QuickGELU")  # fmt: skip
    for owner in (layers, sys.modules.get("timm.models.nfnet")):
        for name in (*names, "GammaAct"):
            cls = getattr(owner, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                _ACTIVATION_TYPES[cls] = None


def _defaults() -> None:
    global _timm_registered
    if not _timm_registered and "timm" in sys.modules:
        _timm_registered = True
        _register_timm()


def _module_class(cls: object, what: str) -> type[nn.Module]:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{what} takes an nn.Module class, got {cls!r}")
    return cls


def register_binarizable(cls: ModuleType | None = None, *, effective_weight: EffectiveWeight | None = None):
    """Registers a float 2D conv class that binarize may convert into a :class:`~binarize.nn.ReCUConv2d`.

    The binary layer starts from the weight the conv applies: ``effective_weight(conv)`` when given (a
    weight-standardised or weight-normalised conv), else ``conv.weight``; the rest of the conv's
    settings (stride, padding, groups, bias) are copied as for ``nn.Conv2d``, so the class must compute
    an ordinary convolution with that weight.

    Args:
        cls: An ``nn.Conv2d`` subclass; omit it to use the function as a decorator with arguments.
        effective_weight: ``fn(conv) -> Tensor`` of the shape of ``conv.weight``, called without grad.

    Returns:
        ``cls`` (or a decorator that registers its argument and returns it).

    Example::

        >>> @register_binarizable(effective_weight=lambda conv: conv.weight * conv.gain.view(-1, 1, 1, 1))
        ... class GainConv2d(nn.Conv2d):
        ...     ...
    """
    if effective_weight is not None and not callable(effective_weight):
        got = repr(effective_weight)
        raise ConfigError(f"register_binarizable: effective_weight must be a function fn(conv), got {got}")

    def register(conv_cls: ModuleType) -> ModuleType:
        _module_class(conv_cls, "register_binarizable")
        if not issubclass(conv_cls, nn.Conv2d):
            raise ConfigError(
                f"register_binarizable: {conv_cls.__name__} is not an nn.Conv2d subclass (only 2D convolutions "
                "are binarized)"
            )
        _BINARIZABLE[conv_cls] = effective_weight
        return conv_cls

    return register if cls is None else register(cls)


def register_leaf_module(cls: ModuleType) -> ModuleType:
    """Registers a module class that the tracer keeps as one call instead of tracing into it.

    Use it for a block torch.fx cannot trace (data-dependent control flow, shape arithmetic): the rest
    of the model is still traced. Convolutions inside a leaf stay float (``unsupported: inside ...``):
    the pass cannot see what feeds them. For one conversion only, pass ``leaf_modules=`` to
    :func:`binarize.convert` instead.

    Returns:
        ``cls``, so that this works as a class decorator.
    """
    _LEAVES[_module_class(cls, "register_leaf_module")] = None
    return cls


def register_activation(activation: Activation) -> Activation:
    """Registers a ReLU-like activation: where its output reaches a binary conv, the conversion replaces
    it on that path (``Policy.activation``: a Hardtanh by default).

    Args:
        activation: A module class (matched by ``isinstance``; also kept as a tracer leaf), a function
            (a Python function is wrapped by the tracer so that its calls show in the graph; call it by
            a global name of your module) or a tensor method name such as ``"relu_"``.

    Returns:
        ``activation``, so that this works as a decorator.
    """
    if isinstance(activation, str):
        if not activation.isidentifier():
            raise ConfigError(f"register_activation: {activation!r} is not a tensor method name")
        _ACTIVATION_METHODS[activation] = None
    elif isinstance(activation, type):
        _ACTIVATION_TYPES[_module_class(activation, "register_activation")] = None
    elif callable(activation):
        _ACTIVATION_FUNCTIONS[activation] = None
    else:
        raise ConfigError(
            f"register_activation takes a module class, a function or a tensor method name, got {activation!r}"
        )
    return activation


def is_binarizable(cls: type) -> bool:
    """Whether instances of ``cls`` (exactly this class) may become binary convs."""
    _defaults()
    return cls in _BINARIZABLE


def binarizable_weight(cls: type) -> EffectiveWeight | None:
    """The registered effective-weight function of ``cls`` (None: the conv applies ``conv.weight``)."""
    _defaults()
    return _BINARIZABLE.get(cls)


def leaf_types() -> tuple[type, ...]:
    """The registered leaf classes and the activation classes (both kept as single calls when tracing)."""
    _defaults()
    return tuple(_LEAVES) + tuple(_ACTIVATION_TYPES)


def activation_types() -> tuple[type, ...]:
    _defaults()
    return tuple(_ACTIVATION_TYPES)


def activation_functions() -> tuple[Callable, ...]:
    _defaults()
    return tuple(_ACTIVATION_FUNCTIONS)


def activation_methods() -> frozenset[str]:
    return frozenset(_ACTIVATION_METHODS)


def tracer_functions() -> tuple[Callable, ...]:
    """The registered activation functions the tracer must wrap: Python functions outside torch (torch's
    own functions show in the graph anyway)."""
    return tuple(
        fn for fn in _ACTIVATION_FUNCTIONS if inspect.isfunction(fn) and not (fn.__module__ or "").startswith("torch")
    )


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as :func:`import_class` reads it back."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(name: str) -> type[nn.Module]:
    """The module class named by :func:`qualified_name`, imported.

    Raises:
        ConfigError: The class cannot be imported (a class defined inside a function, a module not on the path).
    """
    module_name, attrs, why = name, [], "not a qualified class name"
    while "." in module_name:
        module_name, _, attr = module_name.rpartition(".")
        attrs.insert(0, attr)
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            why = str(err) or type(err).__name__
            continue
        try:
            for attr in attrs:
                obj = getattr(obj, attr)
        except AttributeError:
            why = f"module {module_name} has no {'.'.join(attrs)}"
            break
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        why = "not an nn.Module class"
        break
    if "<locals>" in name:
        why = "it was defined inside a function"
    raise ConfigError(f"cannot import {name} ({why}); define the class at the top level of an importable module")
