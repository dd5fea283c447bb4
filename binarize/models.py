"""Building the float model a user names: timm, torchvision, or the user's own factory.

A model specification is a string:

* ``resnet18``: a timm model name (binarize's CIFAR models ``cifar_resnet20`` ... are registered in
  timm's registry too);
* ``torchvision:resnet18``: a torchvision classification model;
* ``path/to/file.py:make_net`` or ``package.module:make_net``: a function of the user's that returns
  an ``nn.Module`` (called with ``num_classes=`` when that is given).

Names are looked up in registries, never evaluated.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect as pyinspect
import socket
import sys
from pathlib import Path
from typing import Any

from torch import nn

from binarize._utils import closest, replace_submodule
from binarize.errors import ModelSpecError
from binarize.weights import load_weights, read_state_dict

__all__ = ["create_model", "parse_spec", "SOURCE_ATTR"]

SOURCE_ATTR = "binarize_source"
_NETWORK_HINTS = (
    "connection", "resolve", "network", "offline", "timed out", "urlopen", "hub", "max retries", "localentrynotfound",
)  # fmt: skip


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Splits a specification into ``(kind, target, factory)``, kind being timm, torchvision, file or module."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model specification; give a timm name, torchvision:NAME or FILE.py:FACTORY")
    if spec.startswith("torchvision:"):
        return "torchvision", spec.split(":", 1)[1], None
    if ":" in spec:
        target, _, factory = spec.rpartition(":")
        if not factory.isidentifier():
            raise ModelSpecError(f"'{spec}': the part after ':' must be a function name, e.g. my_models.py:make_net")
        return ("file" if target.endswith(".py") else "module"), target, factory
    return "timm", spec, None


def _is_network_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, (ConnectionError, TimeoutError, OSError)) or any(h in text for h in _NETWORK_HINTS)


@contextlib.contextmanager
def _hub_offline_when_unreachable(host: str = "huggingface.co"):
    """Hugging Face Hub offline mode when ``host`` does not resolve: cached weights still load, and a
    missing file fails at once instead of after a minute of retries."""
    try:
        socket.getaddrinfo(host, 443)
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    import binarize.zoo  # noqa: F401 - registers binarize's CIFAR models in timm

    if not timm.is_model(name):
        raise ModelSpecError(f"unknown model '{name}'{closest(name, timm.list_models())}")
    try:
        with _hub_offline_when_unreachable() if pretrained else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except ModelSpecError:
        raise
    except Exception as err:
        if pretrained and _is_network_error(err):
            raise ModelSpecError(
                f"could not download pretrained weights for '{name}' ({type(err).__name__}); "
                "use --weights FILE or --no-pretrained"
            ) from err
        raise ModelSpecError(f"cannot build '{name}': {err}") from err


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, last = n, m
    if last is None or last.out_features == num_classes:
        return
    replace_submodule(model, name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def _torchvision_model(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelSpecError(f"unknown torchvision model '{name}'{closest(name, available)}")
    if not pretrained:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as err:
        if _is_network_error(err):
            raise ModelSpecError(
                f"could not download pretrained weights for 'torchvision:{name}' ({type(err).__name__}); "
                "use --weights FILE or --no-pretrained"
            ) from err
        raise ModelSpecError(f"cannot build 'torchvision:{name}': {err}") from err
    if num_classes is not None:
        _replace_last_linear(model, num_classes)
    return model


def _load_factory(kind: str, target: str, factory: str):
    if kind == "file":
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"model file not found: {target}")
        module_name = f"binarize_user_{path.stem}_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ModelSpecError(f"importing {target} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ModelSpecError(f"cannot import module '{target}': {err}") from err
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelSpecError(f"'{target}' has no function '{factory}'{closest(factory, names)}")
    return fn


def _user_model(kind: str, target: str, factory: str, num_classes: int | None) -> nn.Module:
    fn = _load_factory(kind, target, factory)
    kwargs = {}
    if num_classes is not None:
        params = pyinspect.signature(fn).parameters
        accepts = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not accepts:
            raise ModelSpecError(f"{factory}() takes no num_classes argument; drop --num-classes or add the parameter")
        kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"{factory}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(
    spec: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    weights: str | Path | None = None,
) -> nn.Module:
    """Builds the float model that ``spec`` names, optionally with weights from a file.

    Args:
        spec: ``NAME`` (timm), ``torchvision:NAME``, ``FILE.py:FACTORY`` or ``package.module:FACTORY``.
        pretrained: Download the timm/torchvision pretrained weights (ignored with ``weights``).
        num_classes: Number of output classes (the head is replaced where needed).
        weights: A state-dict file (.safetensors, .pt, .pth, .th) to load, in any of the common
            nestings (see :func:`binarize.weights.read_state_dict`).

    Returns:
        The model, in eval mode, with a ``binarize_source`` dict that :func:`binarize.save` records
        so :func:`binarize.load` can rebuild it.

    Raises:
        ModelSpecError: Unknown name (with the closest names), unreachable download, bad factory.
        WeightsError: The weights file is unreadable or does not fit.
    """
    kind, target, factory = parse_spec(spec)
    use_pretrained = pretrained and weights is None
    if kind == "timm":
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = _timm_model(target, use_pretrained, kwargs)
    elif kind == "torchvision":
        model = _torchvision_model(target, use_pretrained, num_classes)
    else:
        model = _user_model(kind, target, factory, num_classes)
    if weights is not None:
        load_weights(model, read_state_dict(weights))
    canonical = spec.strip()
    if kind == "file":
        canonical = f"{Path(target).expanduser().resolve()}:{factory}"
    setattr(model, SOURCE_ATTR, {"spec": canonical, "num_classes": num_classes})
    return model.eval()
