"""Tests of binarize.conversion.registry: user-registered binarizable convs, leaf modules and activations, the
per-call ``leaf_modules=`` argument, and timm's classes registered without binarize importing timm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import binarize
from binarize.conversion import register_activation, register_binarizable, register_leaf_module, registry
from binarize.errors import ConfigError
from binarize.nn import ReCUConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small models run best on one thread


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test are undone after it (the registries are process-wide)."""
    registry.leaf_types()  # timm's classes are registered first (lazily, once), so that they stay registered
    for attr in ("_BINARIZABLE", "_LEAVES", "_ACTIVATION_TYPES", "_ACTIVATION_FUNCTIONS", "_ACTIVATION_METHODS"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def sign_conv(layer: ReCUConv2d, x: torch.Tensor) -> torch.Tensor:
    """alpha_o * conv(sign(x), sign(W - mean_o)) + bias: what a binary conv computes, written out."""
    w = layer.weight.detach().double()
    signs = sign(w - w.mean(dim=(1, 2, 3), keepdim=True))
    weight = layer.alpha.detach().double().view(-1, 1, 1, 1) * signs
    bias = None if layer.bias is None else layer.bias.detach().double()
    return F.conv2d(sign(x.double()), weight, bias, layer.stride, layer.padding).float()


# ---------------------------------------------------------------------------------------------------
# A user-defined conv type: weight normalisation (Salimans & Kingma 2016), w = g * v / ||v|| per filter


class WNConv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.g = nn.Parameter(torch.rand(self.out_channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, wn_weight(self), self.bias)


def wn_weight(conv: WNConv2d) -> torch.Tensor:
    return conv.g.view(-1, 1, 1, 1) * conv.weight / conv.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class WNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.wn, self.bn2 = WNConv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn2(self.wn(self.act(self.bn1(self.stem(x))))).mean((2, 3)))


def test_a_registered_conv_is_binarized_from_the_weight_it_applies(clean_registry):
    torch.manual_seed(0)
    model = WNNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = binarize.convert(model, example_inputs=x[:1])
    assert type(before.wn) is WNConv2d
    assert binarize.binarize_meta(before).layers["wn"].reason == "unsupported: WNConv2d has a forward of its own"

    assert register_binarizable(WNConv2d, effective_weight=wn_weight) is WNConv2d
    binary = binarize.convert(model, example_inputs=x[:1]).eval()
    assert isinstance(binary.wn, ReCUConv2d) and binarize.binarize_meta(binary).layers["wn"].reason == "binarized"
    v, g = model.wn.weight.detach().double(), model.wn.g.detach().double()
    expected = g.view(-1, 1, 1, 1) * v / torch.sqrt((v**2).sum(dim=(1, 2, 3))).view(-1, 1, 1, 1)  # float64 reference
    torch.testing.assert_close(binary.wn.weight.double(), expected, rtol=1e-5, atol=1e-6)
    centred = expected - expected.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(binary.wn.alpha.double(), centred.abs().mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        h = F.hardtanh(model.bn1(model.stem(x)))
        torch.testing.assert_close(binary(x), model.fc(model.bn2(sign_conv(binary.wn, h)).mean((2, 3))))


def test_register_binarizable_as_a_decorator_and_its_errors(clean_registry):
    @register_binarizable
    class PlainSubclass(nn.Conv2d):
        pass

    @register_binarizable(effective_weight=lambda conv: 2 * conv.weight)
    class Doubled(nn.Conv2d):
        pass

    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Conv2d(3, 16, 3), PlainSubclass(16, 16, 3), Doubled(16, 16, 3), *head)
    binary = binarize.convert(model, example_inputs=torch.randn(1, 3, 12, 12))
    assert isinstance(binary.get_submodule("1"), ReCUConv2d) and isinstance(binary.get_submodule("2"), ReCUConv2d)
    torch.testing.assert_close(binary.get_submodule("1").weight, model[1].weight)
    torch.testing.assert_close(binary.get_submodule("2").weight, 2 * model[2].weight)

    class SubclassOfRegistered(PlainSubclass):  # looked up exactly: its forward may differ
        pass

    model = nn.Sequential(nn.Conv2d(3, 16, 3), SubclassOfRegistered(16, 16, 3), *head)
    reasons = binarize.binarize_meta(binarize.convert(model, None, torch.randn(1, 3, 8, 8))).layers
    assert reasons["1"].reason == "unsupported: SubclassOfRegistered has a forward of its own"

    with pytest.raises(ConfigError, match=r"^register_binarizable: Conv1d is not an nn.Conv2d subclass"):
        register_binarizable(nn.Conv1d)
    with pytest.raises(ConfigError, match=r"^register_binarizable takes an nn.Module class, got 3$"):
        register_binarizable(3)
    with pytest.raises(ConfigError, match=r"^register_binarizable: effective_weight must be a function"):
        register_binarizable(WNConv2d, effective_weight="weight")

    @register_binarizable(effective_weight=lambda conv: conv.weight.flatten(1))
    class BadShape(nn.Conv2d):
        pass

    with pytest.raises(ConfigError, match=r"effective_weight registered for BadShape returned \(16, 144\), expected"):
        binarize.convert(nn.Sequential(nn.Conv2d(3, 16, 3), BadShape(16, 16, 3), *head), None, torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------
# Leaf modules


class Router(nn.Module):
    """A block torch.fx cannot trace (data-dependent control flow), with a conv inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else -x


class RoutedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.router = Router()
        self.conv, self.bn2, self.act2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.router(self.act1(self.bn1(self.stem(x))))
        return self.fc(self.act2(self.bn2(self.conv(x))).mean((2, 3)))


def _check_routed(binary: nn.Module) -> None:
    record = binarize.binarize_meta(binary)
    assert record.traced is True and isinstance(binary, fx.GraphModule)
    assert record.layers["router.conv"].reason == "unsupported: inside Router, which torch.fx does not trace into"
    assert isinstance(binary.conv, ReCUConv2d) and type(binary.router.conv) is nn.Conv2d


def test_leaf_modules_for_one_conversion():
    model = RoutedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    untraced = binarize.binarize_meta(binarize.convert(model, example_inputs=x[:1]))
    assert untraced.traced is False and "control flow" in untraced.trace_error
    binary = binarize.convert(model, example_inputs=x[:1], leaf_modules=[Router])
    _check_routed(binary)
    assert binarize.binarize_meta(binary).leaf_modules == (f"{__name__}.Router",)
    assert registry.import_class(f"{__name__}.Router") is Router
    assert binarize.binarize_meta(binarize.convert(model, example_inputs=x[:1], leaf_modules=Router)).traced
    assert binarize.binarize_meta(binarize.convert(model, example_inputs=x[:1])).traced is False  # this call only
    with torch.no_grad():
        assert binary.eval()(x).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"^leaf_modules: expected nn.Module classes, got 'Router'$"):
        binarize.convert(model, example_inputs=x[:1], leaf_modules=["Router"])


def test_register_leaf_module(clean_registry):
    assert register_leaf_module(Router) is Router
    binary = binarize.convert(RoutedNet().eval(), example_inputs=torch.randn(1, 3, 8, 8))
    _check_routed(binary)
    assert binarize.binarize_meta(binary).leaf_modules == ()  # registered, not passed for this call
    with pytest.raises(ConfigError, match=r"^register_leaf_module takes an nn.Module class, got <function"):
        register_leaf_module(F.relu)


def test_import_class_errors():
    with pytest.raises(ConfigError, match=r"^cannot import nope\.Block \(No module named 'nope'\); define the class"):
        registry.import_class("nope.Block")
    with pytest.raises(ConfigError, match=r"\(module torch\.nn has no NoSuchModule\)"):
        registry.import_class("torch.nn.NoSuchModule")
    with pytest.raises(ConfigError, match=r"\(it was defined inside a function\)"):
        registry.import_class(f"{__name__}.test_import_class_errors.<locals>.Block")


# ---------------------------------------------------------------------------------------------------
# Activations


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) ** 2


def clipped_relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 6.0)


class ActNet(nn.Module):
    """stem -> bn1 -> activation -> conv -> bn2 -> head; ``form`` picks how the activation is written."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = SquaredReLU()
        self.conv, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.stem(x))
        if self.form == "module":
            a = self.act(h)
        elif self.form == "function":
            a = clipped_relu(h)
        else:
            a = h.square()
        return self.fc(self.bn2(self.conv(a)).mean((2, 3)))


@pytest.mark.parametrize(("form", "registered", "site"), [
    ("module", SquaredReLU, "act"), ("function", clipped_relu, "clipped_relu"), ("method", "square", "square"),
])  # fmt: skip
def test_a_registered_activation_feeding_a_binary_conv_is_replaced(clean_registry, form, registered, site):
    torch.manual_seed(0)
    model = ActNet(form).eval()
    x = torch.randn(2, 3, 8, 8)
    before = binarize.convert(model, example_inputs=x[:1])
    assert binarize.binarize_meta(before).activations_replaced == ()
    assert register_activation(registered) is registered
    binary = binarize.convert(model, example_inputs=x[:1]).eval()
    assert binarize.binarize_meta(binary).activations_replaced == (site,)
    seen = []
    binary.conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = binary(x)
        h = model.bn1(model.stem(x))
    torch.testing.assert_close(seen[0], F.hardtanh(h))  # the binary conv sees both signs
    torch.testing.assert_close(out, model.fc(model.bn2(sign_conv(binary.conv, F.hardtanh(h))).mean((2, 3))))


def test_register_activation_errors():
    with pytest.raises(ConfigError, match=r"^register_activation takes a module class, a function or a tensor"):
        register_activation(3)
    with pytest.raises(ConfigError, match=r"^register_activation: 'not a name' is not a tensor method name$"):
        register_activation("not a name")
    with pytest.raises(ConfigError, match=r"^register_activation takes an nn.Module class, got <class 'int'>$"):
        register_activation(int)


def test_the_decorators_are_exported():
    import binarize.conversion as conversion

    assert {"register_activation", "register_binarizable", "register_leaf_module"} <= set(conversion.__all__)


# ---------------------------------------------------------------------------------------------------
# timm's classes, registered without binarize importing timm

_PROBE = r"""
import json, sys
import torch
from binarize.conversion import registry
from torch import nn
before = {"timm": "timm" in sys.modules, "binarizable": registry.is_binarizable(nn.Conv2d),
          "types": len(registry.activation_types())}
before["timm_after_lookup"] = "timm" in sys.modules
import timm
from timm.layers import ScaledStdConv2d, StdConv2d, activations
after = {"std": registry.is_binarizable(StdConv2d) and registry.is_binarizable(ScaledStdConv2d),
         "gelu": activations.GELU in registry.activation_types(),
         "leaf": activations.GELU in registry.leaf_types()}
print(json.dumps({"before": before, "after": after}))
"""


def test_timm_classes_are_registered_lazily_without_importing_timm():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["before"] == {"timm": False, "binarizable": True, "types": 12, "timm_after_lookup": False}
    assert result["after"] == {"std": True, "gelu": True, "leaf": True}
