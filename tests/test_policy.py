"""Tests of binarize.conversion.policy: the per-layer decision and its precedence, strict validation, round trips,
and the reasons a conversion reports."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import binarize
from binarize.conversion.policy import Decision, LayerFacts, Policy, decide
from binarize.errors import BinarizeError, ConfigError
from binarize.nn import LayerOptions, ReCUConv2d

CONV_TYPES = ("Conv2d", "_ConvNd", "Module", "object")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run as fast on one thread, and two threads stall badly when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def facts(name: str = "layer1.0.conv1", **kwargs) -> LayerFacts:
    return LayerFacts(name=name, type_names=CONV_TYPES, **{"in_channels": 64, **kwargs})


# ---------------------------------------------------------------------------------------------------
# Precedence: unsupported > exact name > first/last > glob/regex (keep before binarize) > type > defaults


def test_default_is_binarized():
    assert decide(Policy(), facts()) == Decision(True, "binarized")


def test_unsupported_beats_an_exact_binarize_rule():
    d = decide(Policy(binarize=("layer1.0.conv1",)), facts(unsupported="Conv2dSame has a forward of its own"))
    assert d == Decision(False, "unsupported: Conv2dSame has a forward of its own")


def test_exact_name_beats_first_and_last():
    assert decide(Policy(binarize=("stem",)), facts("stem", is_first=True)) == Decision(True, "user rule binarize:stem")
    assert decide(Policy(binarize=("head",)), facts("head", is_last=True)) == Decision(True, "user rule binarize:head")
    assert decide(Policy(keep=("layer1.0.conv1",)), facts()) == Decision(False, "user rule keep:layer1.0.conv1")


def test_exact_name_beats_a_glob_of_the_other_list():
    policy = Policy(keep=("layer1.*",), binarize=("layer1.0.conv1",))
    assert decide(policy, facts()) == Decision(True, "user rule binarize:layer1.0.conv1")


def test_first_and_last_beat_globs_and_regexes():
    policy = Policy(binarize=("*", "re:.*"))
    assert decide(policy, facts("stem", is_first=True)) == Decision(False, "first conv")
    assert decide(policy, facts("head", is_last=True)) == Decision(False, "last layer")
    assert decide(policy.replace(keep_first=False), facts("stem", is_first=True)) == Decision(
        True, "user rule binarize:*"
    )


def test_glob_and_regex_keep_before_binarize_and_in_order():
    policy = Policy(keep=("re:layer1\\..*", "layer1.*"), binarize=("layer*",))
    assert decide(policy, facts()) == Decision(False, "user rule keep:re:layer1\\..*")
    assert decide(policy, facts("layer2.0.conv1")) == Decision(True, "user rule binarize:layer*")


def test_regex_matches_the_whole_name():
    assert decide(Policy(keep=("re:layer1",)), facts()).binary
    assert not decide(Policy(keep=("re:layer1.*conv1",)), facts()).binary


def test_globs_and_regexes_beat_type_rules():
    policy = Policy(keep=("type:Conv2d",), binarize=("layer1.*",))
    assert decide(policy, facts()) == Decision(True, "user rule binarize:layer1.*")
    assert decide(policy, facts("layer2.0.conv1")) == Decision(False, "user rule keep:type:Conv2d")


def test_type_rules_match_base_classes_keep_first():
    policy = Policy(keep=("type:_ConvNd",), binarize=("type:Conv2d",))
    assert decide(policy, facts()) == Decision(False, "user rule keep:type:_ConvNd")
    assert decide(Policy(keep=("type:Linear",)), facts()).binary


def test_type_rules_beat_structural_defaults():
    policy = Policy(binarize=("type:Conv2d",))
    for flags in ({"groups": 64}, {"groups": 4}, {"is_shortcut_1x1": True}, {"is_se": True}, {"in_channels": 3}):
        assert decide(policy, facts(**flags)) == Decision(True, "user rule binarize:type:Conv2d"), flags


@pytest.mark.parametrize(
    ("flags", "reason", "switch"),
    [
        ({"groups": 64}, "depthwise", "keep_depthwise"),
        ({"groups": 4}, "grouped", "keep_grouped"),
        ({"is_shortcut_1x1": True}, "1x1 shortcut", "keep_shortcut_1x1"),
        ({"is_se": True}, "squeeze-excitation", "keep_se"),
        ({"is_first": True}, "first conv", "keep_first"),
        ({"is_last": True}, "last layer", "keep_last"),
    ],
)
def test_structural_defaults_and_their_switches(flags, reason, switch):
    assert decide(Policy(), facts(**flags)) == Decision(False, reason)
    assert decide(Policy(**{switch: False}), facts(**flags)) == Decision(True, "binarized")


def test_structural_defaults_in_order():
    assert decide(Policy(), facts(groups=64, is_shortcut_1x1=True, is_se=True, in_channels=64)).reason == "depthwise"
    assert decide(Policy(), facts(is_shortcut_1x1=True, is_se=True)).reason == "1x1 shortcut"
    assert decide(Policy(), facts(is_se=True, in_channels=3)).reason == "squeeze-excitation"


def test_min_in_channels():
    assert decide(Policy(), facts(in_channels=7)) == Decision(False, "fewer than 8 input channels")
    assert decide(Policy(), facts(in_channels=8)).binary
    assert decide(Policy(min_in_channels=0), facts(in_channels=1)).binary
    assert decide(Policy(min_in_channels=65), facts()) == Decision(False, "fewer than 65 input channels")


def test_linear_layers_stay_float_whatever_the_rules():
    linear = LayerFacts("fc", ("Linear", "Module", "object"), op="linear", in_channels=512)
    assert decide(Policy(binarize=("fc",)), linear) == Decision(False, "linear layers stay float (not supported yet)")
    assert decide(Policy(), LayerFacts("fc", ("Linear",), op="linear", is_last=True)) == Decision(False, "last layer")


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keep_frist": True}, "policy: unknown key 'keep_frist'; did you mean 'keep_first'?"),
        ({"shortcut": "bireal"}, "policy: unknown key 'shortcut'; did you mean 'shortcuts'?"),
        (
            {"activation": "relu"},
            "policy.activation: must be one of 'hardtanh', 'identity', 'prelu', 'keep', got 'relu'",
        ),
        (
            {"shortcuts": "Bireal"},
            "policy.shortcuts: must be one of 'none', 'bireal', got 'Bireal'; did you mean 'bireal'?",
        ),
        (
            {"shortcut_downsample": "pad"},
            "policy.shortcut_downsample: must be one of 'avgpool_conv', 'zero_pad', 'shared'",
        ),
        ({"keep": ["re:("]}, "policy.keep: invalid regex '('"),
        ({"binarize": ["re:[a-"]}, "policy.binarize: invalid regex '[a-'"),
        ({"keep": ["layer1.*"], "binarize": ["layer1.*"]}, "policy.keep: 'layer1.*' is in both keep and binarize"),
        ({"keep": ["type:Conv 2d"]}, "policy.keep: type rules name a class"),
        ({"keep": [""]}, "policy.keep: rules are non-empty strings"),
        ({"keep": "layer4.*"}, "policy.keep: expected a list"),
        ({"keep_first": "yes"}, "policy.keep_first: expected true or false, got 'yes'"),
        ({"min_in_channels": -1}, "policy.min_in_channels: must be >= 0"),
        ({"min_in_channels": 1.5}, "policy.min_in_channels: expected an integer"),
        ({"version": 3}, "policy.version: this binarize reads Policy version 2, got 3"),
        ({"binarize_weights": False}, "policy.binarize_weights: this setting moved to the layer options"),
    ],
)
def test_from_dict_rejects_bad_input(data, message):
    with pytest.raises(ConfigError) as info:
        Policy.from_dict(data, "policy")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "relu"}, "activation: must be one of 'hardtanh', 'identity', 'prelu', 'keep', got 'relu'"),
        ({"shortcuts": "yes"}, "shortcuts: must be one of 'none', 'bireal'"),
        ({"keep": "layer4.*"}, "keep: expected a list of rules, got 'layer4.*'"),  # not a substring match
        ({"keep": ("re:(",)}, "keep: invalid regex"),
        ({"keep": ("a",), "binarize": ["a"]}, "keep: 'a' is in both keep and binarize"),
        ({"binarize": (3,)}, "binarize: rules are non-empty strings, got 3"),
    ],
)
def test_constructor_validates_like_from_dict(kwargs, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
        Policy(**kwargs)


def test_config_errors_are_binarize_errors_and_value_errors():
    with pytest.raises(BinarizeError):
        Policy.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        Policy(min_in_channels=-1)
    with pytest.raises(ConfigError, match="expected a mapping"):
        Policy.from_dict(["keep"], "policy")


def test_policy_is_frozen_and_replace_validates():
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.keep_first = False  # type: ignore[misc]
    with pytest.raises(ConfigError):
        policy.replace(activation="tanh")
    assert policy.replace(keep=["layer4.*"]).keep == ("layer4.*",)


# ---------------------------------------------------------------------------------------------------
# Round trips


def test_to_dict_from_dict_round_trip():
    policy = Policy(
        keep_first=False,
        keep_se=False,
        min_in_channels=4,
        keep=("layer4.*", "re:.*downsample\\.0$"),
        binarize=("type:Conv2d",),
        activation="prelu",
        shortcuts="bireal",
        shortcut_downsample="zero_pad",
    )
    data = policy.to_dict()
    assert data["keep"] == ["layer4.*", "re:.*downsample\\.0$"] and isinstance(data["binarize"], list)
    assert Policy.from_dict(data) == policy
    assert Policy.from_dict(json.loads(json.dumps(data))) == policy
    assert Policy.from_dict({}) == Policy() and Policy.from_dict(Policy().to_dict()) == Policy()


def test_layer_options_round_trip_and_validation():
    options = LayerOptions(binarize_weights=False, activation_bias=True, tau=0.9)
    assert LayerOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    with pytest.raises(ConfigError, match="^tau: must lie in"):
        LayerOptions(tau=0.2)
    with pytest.raises(ConfigError, match="^layer.activation_bias: expected true or false"):
        LayerOptions.from_dict({"activation_bias": "yes"}, "layer")


def test_constructor_checks_types_like_from_dict():
    with pytest.raises(ConfigError, match="^min_in_channels: expected an integer, got '8'$"):
        Policy(min_in_channels="8")
    with pytest.raises(ConfigError, match="^activation: must be one of"):
        Policy(activation="tanh")


_rules = st.lists(st.sampled_from(["layer1.*", "re:.*conv2", "type:Conv2d", "fc", "stem.conv"]), unique=True)


@settings(deadline=None, max_examples=50)
@given(
    keep=_rules,
    activation=st.sampled_from(["hardtanh", "identity", "prelu", "keep"]),
    shortcuts=st.sampled_from(["none", "bireal"]),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    min_in=st.integers(0, 1024),
)
def test_round_trip_property(keep, activation, shortcuts, flags, min_in):
    policy = Policy(
        *flags, min_in_channels=min_in, keep=keep, activation=activation, shortcuts=shortcuts,
    )  # fmt: skip
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


# ---------------------------------------------------------------------------------------------------
# Reasons, as a conversion reports them


class Structures(nn.Module):
    """One layer of every kind the policy tells apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.grouped, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.conv_a, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv_b, self.bn4 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.proj, self.bn5 = nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64)
        self.se_reduce, self.se_expand = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.narrow, self.bn6 = nn.Conv2d(64, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.wide, self.bn7 = nn.Conv2d(4, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        y = self.bn4(self.conv_b(torch.relu(self.bn3(self.conv_a(x))))) + self.bn5(self.proj(x))
        y = torch.relu(y)
        y = y * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = torch.relu(self.bn6(self.narrow(y)))
        y = torch.relu(self.bn7(self.wide(y)))
        return self.fc(y.mean((2, 3)))


def _reasons(
    policy: Policy | None = None, model: nn.Module | None = None, size: int = 8, layer: LayerOptions | None = None
) -> dict[str, str]:
    binary = binarize.convert(model or Structures(), policy, (torch.randn(1, 3, size, size),), layer=layer)
    reasons = {e.name: e.reason for e in binarize.inspect(binary).layers}
    for e in binarize.inspect(binary).layers:  # the reason and the module type agree
        assert isinstance(binary.get_submodule(e.name), ReCUConv2d) == (e.decision == "binary")
    return reasons


def test_reasons_of_the_structural_defaults():
    assert _reasons() == {
        "stem": "first conv",
        "dw": "depthwise",
        "grouped": "grouped",
        "conv_a": "binarized",
        "conv_b": "binarized",
        "proj": "1x1 shortcut",
        "se_reduce": "squeeze-excitation",
        "se_expand": "squeeze-excitation",
        "narrow": "binarized",
        "wide": "fewer than 8 input channels",
        "fc": "last layer",
    }


def test_reasons_of_user_rules():
    reasons = _reasons(Policy(keep=("conv_*",), binarize=("dw", "re:se_.*")))
    assert reasons["conv_a"] == reasons["conv_b"] == "user rule keep:conv_*"
    assert reasons["dw"] == "user rule binarize:dw"
    assert reasons["se_reduce"] == reasons["se_expand"] == "user rule binarize:re:se_.*"
    reasons = _reasons(Policy(binarize=("type:Conv2d",)))
    assert reasons["stem"] == "first conv"
    assert {reasons[n] for n in ("dw", "grouped", "proj", "se_reduce", "wide")} == {"user rule binarize:type:Conv2d"}


def test_switching_the_defaults_off():
    policy = Policy(
        keep_first=False, keep_last=False, keep_depthwise=False, keep_grouped=False, keep_shortcut_1x1=False,
        keep_se=False, min_in_channels=0,
    )  # fmt: skip
    reasons = _reasons(policy)
    assert reasons.pop("fc") == "linear layers stay float (not supported yet)"  # not kept as "last layer"
    assert set(reasons.values()) == {"binarized"}


def test_activations_only_reason():
    reasons = _reasons(layer=LayerOptions(binarize_weights=False))
    assert reasons["conv_a"] == "binarized (activations only)"


def test_user_rule_reason_on_a_torchvision_resnet():
    model = torchvision.models.resnet18(num_classes=10)
    reasons = _reasons(Policy(keep=("layer4.*",)), model, size=32)
    layer4 = {n: r for n, r in reasons.items() if n.startswith("layer4.")}
    assert len(layer4) == 5 and set(layer4.values()) == {"user rule keep:layer4.*"}
    assert reasons["layer3.0.downsample.0"] == "1x1 shortcut"
    assert (
        reasons["layer3.0.conv1"] == "binarized" and reasons["conv1"] == "first conv" and reasons["fc"] == "last layer"
    )


def test_a_rule_that_matches_no_layer_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.raises(ConfigError, match=r"keep: rule 'layer4\.\*' matches no conv or linear layer"):
        binarize.convert(model, Policy(keep=("layer4.*",)), (torch.zeros(1, 3, 16, 16),))
    with pytest.raises(ConfigError, match="binarize: rule 'type:Linear' matches no"):
        binarize.convert(model, Policy(binarize=("type:Linear",)), (torch.zeros(1, 3, 16, 16),))
