"""Building the float model a user names: timm, torchvision, or the user's own factory.

A model specification is a string:

* ``resnet18``: a timm model name (binarize's CIFAR models ``cifar_resnet20`` ... are registered in
  timm's registry too);
* ``hf-hub:timm/resnet18.a1_in1k`` or ``local-dir:PATH``: timm's own forms, a model whose
  configuration (and weights) come from the Hugging Face Hub or a local folder;
* ``torchvision:resnet18``: a torchvision classification model;
* ``path/to/file.py:make_net`` or ``package.module:make_net``: a function of the user's that returns
  an ``nn.Module`` (called with ``num_classes=`` when that is given).

Names are looked up in registries, never evaluated. Nothing here changes process-wide state: whether
downloads may be attempted is the caller's ``offline`` argument (binarize's command line decides it
from ``--offline`` and the environment).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect as pyinspect
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from binarize._utils import closest, replace_submodule
from binarize.errors import ConfigError, ModelSpecError
from binarize.weights import LoadSummary, load_weights

__all__ = [
    "SOURCE_ATTR",
    "WEIGHTS_ATTR",
    "NumClassesNotAccepted",
    "PretrainedUnavailable",
    "create_model",
    "loaded_weights",
    "parse_spec",
    "user_module_name",
]

SOURCE_ATTR = "binarize_source"
WEIGHTS_ATTR = "binarize_loaded_weights"
_TIMM_SOURCES = ("hf-hub:", "local-dir:")
_NETWORK_HINTS = (
    "connection", "resolve", "network", "offline", "timed out", "urlopen", "hub", "max retries", "localentrynotfound",
)  # fmt: skip
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedUnavailable(ModelSpecError):
    """Pretrained weights cannot be had: the model has none, or they cannot be downloaded.

    Attributes:
        reason: What is wrong, without the remedy (the command line adds its own words).
    """

    def __init__(self, reason: str, remedy: str = "pass weights=FILE or pretrained=False") -> None:
        super().__init__(f"{reason}; {remedy}")
        self.reason = reason


class NumClassesNotAccepted(ModelSpecError):
    """A user factory has no ``num_classes`` parameter, but a number of classes was given.

    Attributes:
        factory: The factory's name.
        num_classes: The number given.
    """

    def __init__(self, factory: str, num_classes: int) -> None:
        super().__init__(
            f"{factory}() takes no num_classes argument, but num_classes={num_classes} was given; "
            f"leave num_classes unset or add the parameter to {factory}()"
        )
        self.factory, self.num_classes = factory, num_classes


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Splits a specification into ``(kind, target, factory)``.

    kind is ``timm`` (also for timm's ``hf-hub:`` and ``local-dir:`` forms, kept whole in target),
    ``torchvision``, ``file`` or ``module``.
    """
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model specification; give a timm name, torchvision:NAME or FILE.py:FACTORY")
    if spec.startswith(_TIMM_SOURCES):
        if not spec.split(":", 1)[1].strip():
            raise ModelSpecError(f"'{spec}' names no model; write e.g. hf-hub:timm/resnet18.a1_in1k")
        return "timm", spec, None
    if spec.startswith("torchvision:"):
        return "torchvision", spec.split(":", 1)[1], None
    if ":" in spec:
        target, _, factory = spec.rpartition(":")
        if not factory.isidentifier():
            raise ModelSpecError(
                f"'{spec}': the part after ':' must be a function name, e.g. my_models.py:make_net "
                "(timm's Hub models are written hf-hub:ORG/NAME)"
            )
        return ("file" if target.endswith(".py") else "module"), target, factory
    return "timm", spec, None


def _is_network_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, (ConnectionError, TimeoutError, OSError)) or any(h in text for h in _NETWORK_HINTS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_cached(repo: str, filename: str) -> str | None:
    """The local Hugging Face Hub cache's copy of ``filename`` in ``repo`` (``ORG/NAME[@REVISION]``), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, _, revision = repo.partition("@")
    found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    return found if isinstance(found, str) else None


def _torch_hub_cached(url: str) -> str | None:
    """The torch hub cache's copy of a checkpoint URL (where timm and torchvision keep downloads), if any."""
    import torch.hub

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    return path if os.path.isfile(path) else None


def _offline_timm_source(name: str, pretrained: bool) -> tuple[str, dict[str, Any]]:
    """The timm call that needs no network: ``(model name, extra create_model kwargs)``, from the local caches.

    ``hf-hub:REPO`` becomes ``local-dir:`` the cached snapshot; a registered name with ``pretrained`` gets
    its cached checkpoint as ``pretrained_cfg_overlay={"file": ...}``.
    """
    if name.startswith("hf-hub:"):
        repo = name.split(":", 1)[1]
        config = _hub_cached(repo, "config.json")
        if config is None:
            raise PretrainedUnavailable(
                f"'{name}' needs its configuration from the Hugging Face Hub, which is not in the local cache "
                "and cannot be downloaded offline",
                "download it once with the network, or name the architecture in timm's form (e.g. resnet18) "
                "and pass weights=FILE",
            )
        folder = os.path.dirname(config)
        if pretrained and not any(os.path.isfile(os.path.join(folder, f)) for f in _HUB_WEIGHT_FILES):
            raise PretrainedUnavailable(f"the weights of '{name}' are not in the local cache (offline)")
        return f"local-dir:{folder}", {}
    if not pretrained or name.startswith("local-dir:"):
        return name, {}
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    found = None
    if cfg.get("file"):
        found = cfg["file"] if os.path.isfile(cfg["file"]) else None
    elif cfg.get("hf_hub_id"):
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HUB_WEIGHT_FILES)
        found = next((p for p in (_hub_cached(cfg["hf_hub_id"], n) for n in names) if p), None)
    if found is None and cfg.get("url"):
        found = _torch_hub_cached(cfg["url"])
    if found is None and not any(cfg.get(k) for k in ("file", "hf_hub_id", "url")):
        return name, {}  # no weights anywhere: timm (or binarize's zoo) says so itself
    if found is None:
        raise PretrainedUnavailable(f"the pretrained weights of '{name}' are not in the local cache (offline)")
    return name, {"pretrained_cfg_overlay": {"file": found}}


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any], offline: bool) -> nn.Module:
    import timm

    import binarize.zoo  # noqa: F401 - registers binarize's CIFAR models in timm

    source = name.startswith(_TIMM_SOURCES)
    if not source and not timm.is_model(name):
        raise ModelSpecError(f"unknown model '{name}'{closest(name, timm.list_models())}")
    call_name, extra = _offline_timm_source(name, pretrained) if offline else (name, {})
    try:
        return timm.create_model(call_name, pretrained=pretrained, **kwargs, **extra)
    except ModelSpecError:
        raise
    except Exception as err:
        if (pretrained or name.startswith("hf-hub:")) and _is_network_error(err):
            what = f"the model '{name}'" if name.startswith("hf-hub:") else f"pretrained weights for '{name}'"
            raise PretrainedUnavailable(
                f"could not download {what} ({type(err).__name__}: the network or the Hub is unreachable)"
            ) from err
        raise ModelSpecError(f"cannot build '{name}': {_first_line(err)}") from err


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, last = n, m
    if last is None or last.out_features == num_classes:
        return
    replace_submodule(model, name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def _torchvision_model(name: str, pretrained: bool, num_classes: int | None, offline: bool) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelSpecError(f"unknown torchvision model '{name}'{closest(name, available)}")
    if not pretrained:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if offline:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        if _torch_hub_cached(url) is None:
            raise PretrainedUnavailable(
                f"the pretrained weights of 'torchvision:{name}' are not in the local cache (offline)"
            )
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as err:
        if _is_network_error(err):
            raise PretrainedUnavailable(
                f"could not download pretrained weights for 'torchvision:{name}' ({type(err).__name__})"
            ) from err
        raise ModelSpecError(f"cannot build 'torchvision:{name}': {_first_line(err)}") from err
    if num_classes is not None:
        _replace_last_linear(model, num_classes)
    return model


def user_module_name(path: str | Path) -> str:
    """The ``sys.modules`` name a user's model file is imported under: the same in every process.

    Built from the file's stem and a digest of its resolved path, e.g. ``binarize_user_nets_3f2a9c0d1e4b5a67``.
    """
    resolved = Path(path).expanduser().resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    return f"binarize_user_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}"


def _load_factory(kind: str, target: str, factory: str):
    if kind == "file":
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"model file not found: {target}")
        module_name = user_module_name(path)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(module_name, None)
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
            raise NumClassesNotAccepted(factory, num_classes)
        kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"{factory}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def _check_num_classes(num_classes: Any) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ConfigError(f"num_classes: expected an integer, got {num_classes!r}")
    if num_classes < 0:
        raise ConfigError(f"num_classes: must be >= 0 (0 builds the model without its head), got {num_classes}")


def loaded_weights(model: nn.Module) -> LoadSummary | None:
    """What :func:`create_model` loaded from its ``weights`` file (None when it loaded none)."""
    return getattr(model, WEIGHTS_ATTR, None)


def create_model(
    spec: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    offline: bool = False,
    reset_head: bool | None = None,
) -> nn.Module:
    """Builds the float model that ``spec`` names, optionally with weights from a file.

    Args:
        spec: ``NAME`` (timm), ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` (timm's forms),
            ``torchvision:NAME``, ``FILE.py:FACTORY`` or ``package.module:FACTORY``.
        pretrained: Download the timm/torchvision pretrained weights (ignored with ``weights``).
        num_classes: Number of output classes (the head is replaced where needed); 0 builds timm
            models without their head.
        weights: A state-dict file (.safetensors, .pt, .pth, .th) to load, in any of the common
            nestings (see :func:`binarize.weights.read_state_dict`).
        offline: Never touch the network: pretrained weights and ``hf-hub:`` configurations come from
            the local Hugging Face Hub and torch hub caches, or the call fails at once. The default
            lets timm, the Hub and torchvision download (and retry) as they do.
        reset_head: Where only the classifier head of ``weights`` does not fit (weights trained for
            another label set), load everything else and keep the model's freshly initialised head
            (see :func:`binarize.weights.load_weights`). None, the default, does so when ``num_classes``
            is given, the request for a new label set.

    Returns:
        The model, in eval mode, with a ``binarize_source`` dict that :func:`binarize.save` records
        so :func:`binarize.load` can rebuild it (``"head_reset": True`` in it when the head was
        re-initialised), and, with ``weights``, the :class:`~binarize.weights.LoadSummary` that
        :func:`loaded_weights` returns.

    Raises:
        ConfigError: ``num_classes`` is not a count.
        ModelSpecError: Unknown name (with the closest names), bad factory; its subclasses
            :class:`PretrainedUnavailable` (no weights to download, or no network) and
            :class:`NumClassesNotAccepted`.
        WeightsError: The weights file is unreadable or does not fit.
    """
    _check_num_classes(num_classes)
    kind, target, factory = parse_spec(spec)
    use_pretrained = pretrained and weights is None
    if kind == "timm":
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = _timm_model(target, use_pretrained, kwargs, offline)
    elif kind == "torchvision":
        model = _torchvision_model(target, use_pretrained, num_classes, offline)
    else:
        model = _user_model(kind, target, factory, num_classes)
    summary = None
    if weights is not None:
        reset = num_classes is not None if reset_head is None else reset_head
        summary = load_weights(model, weights, reset_head=reset)
    canonical = spec.strip()
    if kind == "file":
        canonical = f"{Path(target).expanduser().resolve()}:{factory}"
    source: dict[str, Any] = {"spec": canonical, "num_classes": num_classes}
    if summary is not None and summary.head_reset:
        source["head_reset"] = True
    setattr(model, SOURCE_ATTR, source)
    if summary is not None:
        setattr(model, WEIGHTS_ATTR, summary)
    return model.eval()
