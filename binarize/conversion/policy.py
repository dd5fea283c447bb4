"""Which layers become binary: the :class:`Policy` and the decision it makes for each layer.

Precedence, highest first (the first that applies decides):

1. a layer binarize cannot convert (an unsupported conv subclass or padding) stays float;
2. a user rule naming the layer exactly (``keep`` or ``binarize``);
3. ``keep_first`` / ``keep_last``: the first conv the input reaches and the last layer before the
   output stay float;
4. user glob and regex rules (``"layer4.*"``, ``"re:.*proj$"``), in the order given, ``keep`` before
   ``binarize`` when both match;
5. user type rules (``"type:Conv2d"``);
6. the structural defaults: depthwise, grouped, 1x1 shortcut (downsample/projection), squeeze-and-
   excitation convs, and convs with fewer than ``min_in_channels`` input channels stay float;
7. every other convolution becomes a :class:`binarize.nn.ReCUConv2d`.

Linear layers other than the head are not binarized yet; they are reported as float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Literal

from binarize.config import Config, check
from binarize.errors import ConfigError

__all__ = ["Policy", "LayerFacts", "Decision", "decide", "check_rules_match"]

_GLOB_CHARS = set("*?[")
VERSION = 2
MOVED_TO_LAYER_OPTIONS = ("binarize_weights", "activation_bias")
"""Policy version 1 fields that are now :class:`binarize.nn.LayerOptions` fields."""


@dataclasses.dataclass(frozen=True)
class Policy(Config):
    """How to convert a float model into a binary one.

    Args:
        keep_first: Keep the first convolution that the input reaches in float.
        keep_last: Keep the last layer before the output (the classifier) in float.
        keep_depthwise: Keep depthwise convolutions (groups == in_channels > 1) in float.
        keep_grouped: Keep other grouped convolutions in float.
        keep_shortcut_1x1: Keep 1x1 downsample/projection convolutions on residual shortcuts in float.
        keep_se: Keep the convolutions of squeeze-and-excitation gates (they act on pooled features).
        min_in_channels: Keep convolutions with fewer input channels than this in float.
        keep: User rules for layers to keep in float: an exact module name, a glob (``layer4.*``),
            a regex (``re:<pattern>``, matched in full) or a type (``type:<ClassName>``).
        binarize: User rules, in the same forms, for layers to binarize against the defaults.
        activation: What replaces a ReLU-family activation whose output reaches a binary conv:
            ``hardtanh`` (default), ``identity``, ``prelu`` (init slope 0.25), or ``keep`` it.
        shortcuts: ``bireal`` adds a real-valued shortcut around each binary conv and its
            BatchNorm (Bi-Real Net, Liu et al. 2018), as in ReCU's published models; ``none``.
        shortcut_downsample: For a Bi-Real shortcut whose shapes differ: ``avgpool_conv`` (average
            pooling and a float 1x1 conv), ``zero_pad`` (average pooling and zero channels) or ``shared``
            (the output of the block's own float 1x1 downsample from the same input, as ReCU's ImageNet
            ResNets share one downsample per block; ``avgpool_conv`` where the block has none).
        version: Schema version of this configuration (2: the layer's own options, weight
            binarization and the activation bias, moved to :class:`binarize.nn.LayerOptions`).

    Example::

        >>> Policy(keep=("layer4.*",), shortcuts="bireal").keep
        ('layer4.*',)
    """

    keep_first: bool = True
    keep_last: bool = True
    keep_depthwise: bool = True
    keep_grouped: bool = True
    keep_shortcut_1x1: bool = True
    keep_se: bool = True
    min_in_channels: int = 8
    keep: tuple[str, ...] = ()
    binarize: tuple[str, ...] = ()
    activation: Literal["hardtanh", "identity", "prelu", "keep"] = "hardtanh"
    shortcuts: Literal["none", "bireal"] = "none"
    shortcut_downsample: Literal["avgpool_conv", "zero_pad", "shared"] = "avgpool_conv"
    version: int = VERSION

    def __post_init__(self) -> None:
        for field in ("keep", "binarize"):  # rule lists first: their messages say how to write a rule
            rules = getattr(self, field)
            check(
                isinstance(rules, (tuple, list)),
                field,
                f"expected a list of rules, got {rules!r}; write {field}=({rules!r},)",
            )
            for rule in rules:
                check(isinstance(rule, str) and rule.strip() != "", field, f"rules are non-empty strings, got {rule!r}")
        super().__post_init__()

    def validate(self) -> None:
        check(self.min_in_channels >= 0, "min_in_channels", f"must be >= 0, got {self.min_in_channels}")
        check(self.version == VERSION, "version", f"this binarize reads Policy version {VERSION}, got {self.version}")
        for field in ("keep", "binarize"):
            for rule in getattr(self, field):
                _validate_rule(field, rule)
        for rule in sorted(set(self.keep) & set(self.binarize)):
            check(False, "keep", f"{rule!r} is in both keep and binarize; remove it from one")

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Policy:
        if isinstance(data, dict):
            for key in MOVED_TO_LAYER_OPTIONS:
                if key in data:
                    label = f"{where}.{key}" if where else key
                    raise ConfigError(
                        f"{label}: this setting moved to the layer options: write layer.{key} "
                        "(binarize.LayerOptions); in a recipe, weight binarization is stages.N.binarize_weights"
                    )
        return super().from_dict(data, where)


def _validate_rule(field: str, rule: str) -> None:
    if rule.startswith("re:"):
        try:
            re.compile(rule[3:])
        except re.error as err:
            check(False, field, f"invalid regex {rule[3:]!r} ({err}); write re:<python regex>")
    elif rule.startswith("type:"):
        name = rule[5:]
        check(name.isidentifier(), field, f"type rules name a class, e.g. type:Conv2d, got {rule!r}")


def _rule_kind(rule: str) -> str:
    if rule.startswith("re:"):
        return "regex"
    if rule.startswith("type:"):
        return "type"
    return "glob" if _GLOB_CHARS & set(rule) else "name"


def _matches(rule: str, name: str, type_names: tuple[str, ...]) -> bool:
    kind = _rule_kind(rule)
    if kind == "regex":
        return re.fullmatch(rule[3:], name) is not None
    if kind == "type":
        return rule[5:] in type_names
    if kind == "glob":
        return fnmatch.fnmatchcase(name, rule)
    return rule == name


@dataclasses.dataclass(frozen=True)
class LayerFacts:
    """What the conversion pass found out about one layer, the input of :func:`decide`.

    Args:
        name: Qualified module name.
        type_names: Names of the module's class and its bases (for ``type:`` rules).
        op: ``conv`` or ``linear``.
        in_channels: Input channels (features for linear layers).
        groups: Convolution groups (1 for linear layers).
        is_first: The first conv the input reaches.
        is_last: The last layer before the output.
        is_shortcut_1x1: A 1x1 conv on a residual shortcut.
        is_se: A conv of a squeeze-and-excitation gate.
        unsupported: Why the layer cannot be binarized, if it cannot.
    """

    name: str
    type_names: tuple[str, ...]
    op: str = "conv"
    in_channels: int = 0
    groups: int = 1
    is_first: bool = False
    is_last: bool = False
    is_shortcut_1x1: bool = False
    is_se: bool = False
    unsupported: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """``binary`` or not, and the reason, as the report shows it."""

    binary: bool
    reason: str


def decide(policy: Policy, facts: LayerFacts) -> Decision:
    """Applies the policy's precedence (module docstring) to one layer."""
    if facts.op != "conv":
        last = facts.is_last and policy.keep_last
        return Decision(False, "last layer" if last else "linear layers stay float (not supported yet)")
    if facts.unsupported:
        return Decision(False, f"unsupported: {facts.unsupported}")
    for field, binary in (("keep", False), ("binarize", True)):
        if facts.name in getattr(policy, field):
            return Decision(binary, f"user rule {field}:{facts.name}")
    if facts.is_first and policy.keep_first:
        return Decision(False, "first conv")
    if facts.is_last and policy.keep_last:
        return Decision(False, "last layer")
    for kinds in (("glob", "regex"), ("type",)):
        for field, binary in (("keep", False), ("binarize", True)):
            for rule in getattr(policy, field):
                if _rule_kind(rule) in kinds and _matches(rule, facts.name, facts.type_names):
                    return Decision(binary, f"user rule {field}:{rule}")
    if facts.groups > 1 and facts.groups == facts.in_channels and policy.keep_depthwise:
        return Decision(False, "depthwise")
    if facts.groups > 1 and facts.groups != facts.in_channels and policy.keep_grouped:
        return Decision(False, "grouped")
    if facts.is_shortcut_1x1 and policy.keep_shortcut_1x1:
        return Decision(False, "1x1 shortcut")
    if facts.is_se and policy.keep_se:
        return Decision(False, "squeeze-excitation")
    if facts.in_channels < policy.min_in_channels:
        return Decision(False, f"fewer than {policy.min_in_channels} input channels")
    return Decision(True, "binarized")


def check_rules_match(policy: Policy, layers: list[LayerFacts]) -> None:
    """Raises :class:`ConfigError` for a ``keep`` / ``binarize`` rule that matches none of ``layers``:
    a misspelt rule would otherwise change nothing, silently."""
    for field in ("keep", "binarize"):
        for rule in getattr(policy, field):
            if not any(_matches(rule, f.name, f.type_names) for f in layers):
                example = next((f.name for f in layers if f.op == "conv"), "conv1")
                raise ConfigError(
                    f"{field}: rule {rule!r} matches no conv or linear layer (names look like '{example}'); "
                    "check its spelling (binarize convert --dry-run lists the layers)"
                )
