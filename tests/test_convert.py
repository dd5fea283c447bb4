"""Tests of binarize.convert: the pass over timm and torchvision architectures, the untraceable fallback,
the activation rewrite, Bi-Real shortcuts, recalibrate_bn, and one conversion checked by hand.

The architecture sweep runs a representative subset by default; ``pytest -m slow`` runs the rest. Every
model has random weights (nothing is downloaded) and a small input.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import binarize
import binarize.zoo  # noqa: F401 - registers the CIFAR models in timm
from binarize.nn import ReCUConv2d
from binarize.nn.shortcut import BiRealShortcut

slow = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run as fast on one thread, and two threads stall badly when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# (spec, input size): "tv:" marks torchvision, anything else is a timm name (binarize's zoo included).
_TIMM_FAST = [
    ("resnet18", 64),
    ("mobilenetv2_050", 64),  # depthwise convs, ReLU6
    ("regnetx_002", 64),  # timm ConvNormAct with fused BatchNormAct2d
    ("mobilenetv3_small_050", 64),  # depthwise, hard-swish, SE, conv head after the global pool
    ("tinynet_e", 64),  # EfficientNet blocks with fused BatchNormAct2d(SiLU)
    ("mobilevit_xxs", 64),  # hard to trace: MobileVitBlock is one of timm's no-trace leaves
    ("efficientvit_b0", 64),  # hard to trace: LiteMLA leaves
    ("tf_efficientnetv2_b0", 64),  # hard to trace: Conv2dSame ("same" padding computed in forward)
    ("convnext_atto", 64),  # depthwise 7x7, LayerNorm, GELU
    ("lcnet_050", 64),
    ("resnet10t", 64),  # tiered deep stem, average-pool downsample
    ("cifar_resnet20", 32),  # binarize's zoo
]
_TIMM_SLOW = [
    ("seresnext26d_32x4d", 64),  # grouped convs, SE convs, 1x1 downsample shortcuts
    ("resnet26d", 64),
    ("resnet50", 64),
    ("regnety_002", 64),
    ("efficientnet_b0", 64),
    ("mnasnet_050", 64),
    ("densenet121", 64),
    ("dla34", 64),
    ("vgg11", 64),
    ("repvgg_a0", 64),
    ("rexnet_100", 64),
    ("ese_vovnet19b_dw", 64),
    ("resnetv2_50x1_bit", 64),
    ("cspresnet50", 64),
    ("darknet17", 64),
    ("hrnet_w18_small", 64),
    ("ghostnet_050", 64),
    ("res2net50_14w_8s", 64),
    ("resnest14d", 64),
    ("skresnet18", 64),
    ("gernet_s", 64),
    ("mobileone_s0", 64),
    ("hardcorenas_a", 64),
    ("botnet26t_256", 256),  # fixed input size
    ("xception41", 64),
    ("dpn48b", 64),
    ("inception_v3", 75),  # needs >= 75 px
    ("cifar_resnet18", 32),
    ("cifar_resnet56", 32),
    ("cifar_vgg_small", 32),
]
_TV_FAST = [
    ("tv:resnet18", 64),
    ("tv:mobilenet_v3_small", 64),
    ("tv:shufflenet_v2_x0_5", 64),
    ("tv:squeezenet1_0", 64),
    ("tv:regnet_x_400mf", 64),
]
_TV_SLOW = [
    ("tv:resnet50", 64),
    ("tv:resnext50_32x4d", 64),
    ("tv:wide_resnet50_2", 64),
    ("tv:mobilenet_v2", 64),
    ("tv:efficientnet_b0", 64),
    ("tv:densenet121", 64),
    ("tv:mnasnet0_5", 64),
    ("tv:googlenet", 64),
    ("tv:vgg11_bn", 64),
    ("tv:convnext_tiny", 64),
]
ARCHITECTURES = [pytest.param(a, id=a[0]) for a in _TIMM_FAST + _TV_FAST] + [
    pytest.param(a, id=a[0], marks=slow) for a in _TIMM_SLOW + _TV_SLOW
]


# ---------------------------------------------------------------------------------------------------
# The checker: what counts as a ReLU-family activation and what a sign can look through. Written here
# independently of binarize.conversion.graph, so that a gap in the library's lists makes a test fail.

_ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.RReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU,
    nn.Softplus,
)  # fmt: skip
_ACTIVATION_TYPE_NAMES = {
    "Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "HardMish", "HardMishMe", "GELU",
    "GELUTanh", "QuickGELU", "GammaAct",
}  # fmt: skip
_ACTIVATION_CALLS = {
    "relu", "relu_", "relu6", "rrelu", "rrelu_", "leaky_relu", "leaky_relu_", "silu", "swish", "gelu", "gelu_tanh",
    "quick_gelu", "hardswish", "hard_swish", "mish", "hard_mish", "elu", "elu_", "celu", "selu", "softplus",
}  # fmt: skip
_PASS_TYPES = (
    nn.modules.batchnorm._BatchNorm, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
)  # fmt: skip
_PASS_CALLS = {
    "max_pool2d", "_max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
    "pad", "dropout", "batch_norm", "contiguous", "clone",
}  # fmt: skip


def is_activation_module(m: nn.Module) -> bool:
    """A ReLU-family activation, or a fused norm-act module (timm's BatchNormAct2d) holding one."""
    if isinstance(m, _ACTIVATION_TYPES) or type(m).__name__ in _ACTIVATION_TYPE_NAMES:
        return True
    act = getattr(m, "act", None)
    return isinstance(act, nn.Module) and act is not m and is_activation_module(act)


def _call_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def feeding_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ReLU-family op reached from ``node``'s input through pass-through ops, described; else None."""
    modules = dict(gm.named_modules())
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        if src.op == "call_module":
            m = modules[src.target]
            if is_activation_module(m):
                return f"{src.target} ({type(m).__name__})"
            passes = isinstance(m, _PASS_TYPES)
        elif src.op in ("call_function", "call_method"):
            if _call_name(src) in _ACTIVATION_CALLS:
                return f"{src.name} ({_call_name(src)})"
            passes = _call_name(src) in _PASS_CALLS
        else:
            passes = False
        if not passes:
            return None
        src = next((a for a in src.args if isinstance(a, fx.Node)), None)
    return None


# ---------------------------------------------------------------------------------------------------
# The sweep


@dataclasses.dataclass
class Case:
    name: str
    float_model: nn.Module
    binary: nn.Module
    x: torch.Tensor
    float_out: torch.Tensor


def build(spec: str) -> nn.Module:
    if spec.startswith("tv:"):
        name = spec[3:]
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return timm.create_model(spec, pretrained=False, num_classes=10)


def _randomise_norms(model: nn.Module) -> None:
    """Positive BatchNorm scales and random shifts: timm zero-initialises the last BN of each residual
    block, which would leave residual sums non-negative for a reason no pretrained model has."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.5, generator=g)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def case(request) -> Case:
    spec, size = request.param
    torch.manual_seed(0)
    model = build(spec).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        float_out = model(x)
    binary = binarize.convert(model, example_inputs=(x[:1],))
    return Case(spec, model, binary.eval(), x, float_out)


def test_converts_traced_and_keeps_the_output_shape(case):
    assert isinstance(case.binary, fx.GraphModule)
    assert binarize.binarize_meta(case.binary).traced is True
    assert any(isinstance(m, ReCUConv2d) for m in case.binary.modules())
    with torch.no_grad():
        out = case.binary(case.x)
        again = case.float_model(case.x)
    assert out.shape == case.float_out.shape
    assert torch.isfinite(out).all()
    assert torch.equal(again, case.float_out)  # convert() left its input alone


def test_backward_reaches_every_trainable_parameter(case):
    model = case.binary
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        model(case.x).sum().backward()
    finally:
        model.eval()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


def test_first_conv_and_head_stay_float(case):
    called = []
    handles = [
        m.register_forward_hook(lambda *_, n=name: called.append(n))
        for name, m in case.float_model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            case.float_model(case.x)
    finally:
        for h in handles:
            h.remove()
    first_conv = next(n for n in called if isinstance(case.float_model.get_submodule(n), nn.Conv2d))
    kept = {first_conv, called[-1]}
    cfg = getattr(case.float_model, "pretrained_cfg", None) or {}
    for key in ("first_conv", "classifier"):
        names = [cfg[key]] if isinstance(cfg.get(key), str) else list(cfg.get(key) or ())
        kept |= {
            n
            for n, m in case.float_model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and any(n == p or n.startswith(p + ".") for p in names)
        }
    for name in sorted(kept):
        layer = case.binary.get_submodule(name)
        assert isinstance(layer, (nn.Conv2d, nn.Linear)) and not isinstance(layer, ReCUConv2d), name


def test_no_relu_family_op_feeds_a_binary_conv(case):
    gm = case.binary
    modules = dict(gm.named_modules())
    called = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], ReCUConv2d):
            called.add(node.target)
            assert feeding_activation(gm, node) is None, f"{node.target} <- {feeding_activation(gm, node)}"
    # every binary conv is called by a graph node, so the walk above saw the inputs of all of them
    assert called == {n for n, m in modules.items() if isinstance(m, ReCUConv2d)}


def test_binary_convs_see_inputs_of_both_signs(case):
    """A value only a ReLU produced (also through concatenation, splits, an SE gate, sums) gives signs of +1."""
    non_negative = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=name: non_negative.append(n) if (args[0] >= 0).all() else None)
        for name, m in case.binary.named_modules()
        if isinstance(m, ReCUConv2d)
    ]
    try:
        with torch.no_grad():
            case.binary(case.x)
    finally:
        for h in handles:
            h.remove()
    assert not non_negative, f"binary convs whose input signs are all +1: {sorted(set(non_negative))}"


def test_report_agrees_with_the_module_types(case):
    report = binarize.inspect(case.binary)
    layers = {n: m for n, m in case.binary.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [e.name for e in report.layers] == list(layers)
    for entry in report.layers:
        module = layers[entry.name]
        binary = isinstance(module, ReCUConv2d)
        assert entry.decision == ("binary" if binary else "float"), entry
        assert entry.op == type(module).__name__
        assert entry.shape == list(module.weight.shape)
        assert (entry.reason == "binarized") == binary, entry
        assert entry.reason != "not converted", entry
        assert not binary or entry.macs > 0, entry
    meta = binarize.binarize_meta(case.binary)
    assert {n: r.decision for n, r in meta.layers.items()} == {e.name: e.decision for e in report.layers}
    s = report.to_dict()["summary"]
    assert s["binary_convs"] == sum(isinstance(m, ReCUConv2d) for m in layers.values()) > 0
    assert s["float_convs"] == sum(isinstance(m, nn.Conv2d) and not isinstance(m, ReCUConv2d) for m in layers.values())
    assert s["float_linears"] == sum(isinstance(m, nn.Linear) for m in layers.values())
    assert s["bops"] == sum(e.macs for e in report.layers if e.decision == "binary") > 0
    assert s["traced"] is True and s["input_size"] == list(case.x.shape[1:])


def test_convs_inside_untraceable_leaf_modules_stay_float():
    # timm keeps MobileVitBlock out of torch.fx (shape arithmetic in its forward); the pass cannot see what
    # feeds the convs inside it, so it must not binarize them.
    torch.manual_seed(0)
    binary = binarize.convert(build("mobilevit_xxs").eval(), example_inputs=(torch.randn(1, 3, 64, 64),))
    leaves = [n for n, m in binary.named_modules() if type(m).__name__ == "MobileVitBlock"]
    assert leaves
    layers = binarize.binarize_meta(binary).layers
    inside = [n for n in layers if any(n.startswith(leaf + ".") for leaf in leaves)]
    assert len(inside) >= 4 * len(leaves)
    for name in inside:
        assert not isinstance(binary.get_submodule(name), ReCUConv2d), name
        if isinstance(binary.get_submodule(name), nn.Conv2d):
            assert layers[name].reason == "unsupported: inside MobileVitBlock, which torch.fx does not trace into"
    assert sum(isinstance(m, ReCUConv2d) for m in binary.modules()) >= 10  # the MobileNetV2 blocks around them


def test_weight_standardised_convs_are_binarized_from_the_weight_they_apply():
    from timm.layers import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), StdConv2d(16, 16, 3, padding=1), ScaledStdConv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    binary = binarize.convert(model, example_inputs=(torch.randn(1, 3, 16, 16),))
    for index in ("1", "2"):
        conv = model.get_submodule(index)
        var, mean = torch.var_mean(conv.weight.flatten(1), dim=1, keepdim=True, correction=0)
        expected = (conv.weight.flatten(1) - mean) / torch.sqrt(var + conv.eps)
        if isinstance(conv, ScaledStdConv2d):
            expected = expected * conv.gain.flatten(1) * conv.scale
        layer = binary.get_submodule(index)
        assert isinstance(layer, ReCUConv2d)
        torch.testing.assert_close(layer.weight, expected.reshape(conv.weight.shape))


# ---------------------------------------------------------------------------------------------------
# Small models whose conversion is checked by hand


def _randomise_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(0.0, 0.3, generator=g)
        bn.running_mean.normal_(0.0, 0.3, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


def sign_conv(layer: ReCUConv2d, x: torch.Tensor) -> torch.Tensor:
    """What a binary conv should compute: alpha_o * conv(sign(x), sign(W - mean_o)) + bias."""
    w = layer.weight.detach()
    signs = sign(w - w.mean(dim=(1, 2, 3), keepdim=True))
    return F.conv2d(sign(x), layer.alpha.detach().view(-1, 1, 1, 1) * signs, layer.bias, layer.stride, layer.padding)


def bn_eval(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class TwoConv(nn.Module):
    """conv1 -> bn1 -> act -> conv2 -> bn2 (+ the activation's output, with ``residual``) -> pool -> fc."""

    def __init__(self, act: nn.Module | None = None, residual: bool = False, stride: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = act if act is not None else nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16 if residual else 32, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.conv2.out_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.conv2.out_channels, 10)
        _randomise_bn(self.bn1, 1)
        _randomise_bn(self.bn2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(a))
        if self.residual:
            y = y + a
        return self.fc(torch.flatten(self.pool(y), 1))


def _head(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return model.fc(y.mean(dim=(2, 3)))


def test_forward_matches_a_manual_computation():
    torch.manual_seed(0)
    model = TwoConv().eval()
    x = torch.randn(2, 3, 12, 12)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    assert isinstance(binary.conv2, ReCUConv2d) and type(binary.conv1) is nn.Conv2d
    w2 = model.conv2.weight
    centred = w2 - w2.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(binary.conv2.alpha, centred.abs().mean(dim=(1, 2, 3)))  # L1-optimal scale
    torch.testing.assert_close(binary.conv2.weight, w2)  # latent weights copied
    with torch.no_grad():
        a = F.hardtanh(bn_eval(model.bn1, F.conv2d(x, model.conv1.weight, padding=1)))
        expected = _head(model, bn_eval(model.bn2, sign_conv(binary.conv2, a)))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_keeps_the_mode_of_each_module():
    model = TwoConv().train()
    model.bn1.eval()
    binary = binarize.convert(model, example_inputs=torch.randn(1, 3, 12, 12))
    assert binary.training and binary.conv2.training and not binary.bn1.training
    assert model.training and not model.bn1.training
    assert not binarize.convert(model.eval(), example_inputs=torch.randn(1, 3, 12, 12)).training


def test_example_inputs_may_be_one_tensor_and_wrappers_are_unwrapped():
    model = TwoConv()
    binary = binarize.convert(nn.DataParallel(model), example_inputs=torch.randn(1, 3, 12, 12))
    meta = binarize.binarize_meta(binary)
    assert meta.input_size == (3, 12, 12) and sorted(meta.layers) == ["conv1", "conv2", "fc"]
    assert binarize.binarize_meta(nn.DataParallel(binary)) is meta
    assert binarize.inspect(nn.DataParallel(binary)).to_dict() == binarize.inspect(binary).to_dict()


def test_split_activation_keeps_the_float_consumer_values():
    torch.manual_seed(0)
    model = TwoConv(residual=True).eval()
    x = torch.randn(2, 3, 12, 12)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    with torch.no_grad():
        h = bn_eval(model.bn1, F.conv2d(x, model.conv1.weight, padding=1))
        expected = _head(model, bn_eval(model.bn2, sign_conv(binary.conv2, F.hardtanh(h))) + F.relu(h))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)
    assert binarize.binarize_meta(binary).activations_replaced == ("act",)


class ReluThenNorm(nn.Module):
    """relu -> bn feeds a binary conv and, through a residual, the float path: the bn is on both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)
        _randomise_bn(self.bn, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.act(self.conv1(x)))
        return self.fc((self.conv2(y) + y).mean((2, 3)))


def test_batchnorm_cloned_onto_the_binary_path_gets_its_own_statistics():
    torch.manual_seed(0)
    model = ReluThenNorm().eval()
    x = torch.randn(2, 3, 8, 8)
    binary = binarize.convert(model, example_inputs=x[:1]).eval()
    with torch.no_grad():
        h = model.conv1(x)
        expected = _head(
            model, sign_conv(binary.conv2, bn_eval(model.bn, F.hardtanh(h))) + bn_eval(model.bn, F.relu(h))
        )
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)
        binary.train()(x)
    norms = [m for m in binary.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 and [int(m.num_batches_tracked) for m in norms] == [1, 1]  # one call each per step


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        self.values[n] = out = super().run_node(n)
        return out


def test_torchvision_resnet18_identity_shortcut_still_sees_the_relu_output():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 32, 32)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    recorder = _Recorder(binary)
    with torch.no_grad():
        recorder.run(x)
        stem = model.bn1(model.conv1(x))
        relu_path, sign_path = model.maxpool(F.relu(stem)), model.maxpool(F.hardtanh(stem))
    adds = [n for n in binary.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)]
    identity = recorder.values[adds[0].args[1]]  # layer1.0: out += identity
    assert torch.equal(identity, relu_path)
    conv = next(n for n in binary.graph.nodes if n.op == "call_module" and n.target == "layer1.0.conv1")
    assert torch.equal(recorder.values[conv.args[0]], sign_path)
    assert (sign_path < 0).any()


@pytest.mark.parametrize(
    ("activation", "expected_type"),
    [("hardtanh", nn.Hardtanh), ("identity", None), ("prelu", nn.PReLU), ("keep", nn.ReLU)],
)
def test_activation_options(activation, expected_type):
    torch.manual_seed(0)
    model = TwoConv().eval()
    x = torch.randn(2, 3, 12, 12)
    binary = binarize.convert(model, binarize.Policy(activation=activation), (x[:1],)).eval()
    conv2 = next(n for n in binary.graph.nodes if n.op == "call_module" and n.target == "conv2")
    feeder = conv2.args[0]
    seen = []
    binary.conv2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        binary(x)
        h = bn_eval(model.bn1, F.conv2d(x, model.conv1.weight, padding=1))
    if expected_type is None:
        assert feeder.target == "bn1"
        torch.testing.assert_close(seen[0], h)
    else:
        module = binary.get_submodule(feeder.target)
        assert type(module) is expected_type
        if activation == "prelu":
            assert module.num_parameters == 16 and torch.all(module.weight == 0.25)
        if activation == "hardtanh":
            assert (module.min_val, module.max_val) == (-1.0, 1.0)
        torch.testing.assert_close(seen[0], module(h))
    replaced = binarize.binarize_meta(binary).activations_replaced
    assert replaced == (() if activation == "keep" else ("act",))


def test_fused_batchnorm_act_is_split_and_rewritten():
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = TwoConv(residual=True).eval()
    fused = BatchNormAct2d(16, act_layer=nn.ReLU)
    fused.load_state_dict(model.bn1.state_dict())
    model.bn1, model.act = fused, nn.Identity()
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    assert isinstance(binary.bn1.act, nn.Identity)  # the activation moved out of the fused module
    with torch.no_grad():
        h = bn_eval(fused, F.conv2d(x, model.conv1.weight, padding=1))
        expected = _head(model, bn_eval(model.bn2, sign_conv(binary.conv2, F.hardtanh(h))) + F.relu(h))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), _head(model, bn_eval(model.bn2, model.conv2(F.relu(h))) + F.relu(h)))


def test_fused_batchnorm_act_in_a_timm_model_is_rewritten():
    torch.manual_seed(0)
    model = build("regnetx_002").eval()
    binary = binarize.convert(model, example_inputs=(torch.randn(1, 3, 64, 64),))
    modules = dict(binary.named_modules())
    fused_before = {
        n for n, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d" and is_activation_module(m)
    }
    split = {n for n in fused_before if isinstance(modules[n].act, nn.Identity)}
    assert split  # some fused norm-acts fed binary convs and were split
    for name in split:  # where a float consumer is left, it keeps the ReLU
        assert isinstance(modules.get(f"{name}_act", nn.ReLU()), nn.ReLU)
    for node in binary.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], ReCUConv2d):
            assert feeding_activation(binary, node) is None


class InplaceResidual(TwoConv):
    def __init__(self, form: str) -> None:
        super().__init__(act=nn.ReLU(inplace=True), residual=True)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        if self.form == "module":
            a = self.act(h)
        elif self.form == "function":
            a = F.relu(h, inplace=True)
        elif self.form == "leaky_relu_":
            a = F.leaky_relu_(h, 0.1)
        else:
            a = h.relu_()
        return self.fc(torch.flatten(self.pool(self.bn2(self.conv2(a)) + a), 1))


@pytest.mark.parametrize("form", ["module", "function", "method", "leaky_relu_"])
def test_inplace_relu_does_not_break_backward(form):
    torch.manual_seed(0)
    model = InplaceResidual(form).eval()
    x = torch.randn(2, 3, 12, 12)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    with torch.no_grad():
        h = bn_eval(model.bn1, F.conv2d(x, model.conv1.weight, padding=1))
        a = F.leaky_relu(h, 0.1) if form == "leaky_relu_" else F.relu(h)
        expected = _head(model, bn_eval(model.bn2, sign_conv(binary.conv2, F.hardtanh(h))) + a)
    out = binary(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    binary.train()
    binary(x).sum().backward()
    assert all(p.grad is not None for p in binary.parameters())


# ---------------------------------------------------------------------------------------------------
# The fallback for models torch.fx cannot trace


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(self.pool1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_untraceable_model_is_converted_by_module_name():
    torch.manual_seed(0)
    model = Untraceable().eval()
    for i, bn in enumerate((model.bn1, model.bn2, model.bn3)):
        _randomise_bn(bn, i)
    x = torch.randn(2, 3, 16, 16)
    binary = binarize.convert(model, example_inputs=(x[:1],))
    assert not isinstance(binary, fx.GraphModule) and isinstance(binary, Untraceable)
    meta = binarize.binarize_meta(binary)
    assert meta.traced is False
    assert meta.trace_error.startswith("TraceError: ") and "control flow" in meta.trace_error
    assert {n: r.reason for n, r in meta.layers.items()} == {
        "conv1": "first conv",
        "conv2": "binarized",
        "conv3": "binarized",
        "fc": "last layer",
    }
    assert type(binary.conv1) is nn.Conv2d and type(binary.fc) is nn.Linear
    assert isinstance(binary.conv2, ReCUConv2d) and isinstance(binary.conv3, ReCUConv2d)
    # relu1 feeds conv2; relu2 feeds conv3 through the max-pool; relu3 feeds only the float head
    assert type(binary.relu1) is nn.Hardtanh and type(binary.relu2) is nn.Hardtanh and type(binary.relu3) is nn.ReLU
    assert sorted(meta.activations_replaced) == ["relu1", "relu2"]
    assert isinstance(model.relu1, nn.ReLU)  # the input model is untouched
    binary.eval()
    with torch.no_grad():
        a = F.hardtanh(bn_eval(model.bn1, model.conv1(x)))
        a = F.max_pool2d(F.hardtanh(bn_eval(model.bn2, sign_conv(binary.conv2, a))), 2)
        expected = _head(model, F.relu(bn_eval(model.bn3, sign_conv(binary.conv3, a))))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)
    binary.train()
    binary(x).sum().backward()
    assert all(p.grad is not None for p in binary.parameters())
    summary = binarize.inspect(binary).to_dict()["summary"]
    assert summary["traced"] is False and summary["trace_error"] == meta.trace_error
    assert (summary["binary_convs"], summary["float_convs"], summary["float_linears"]) == (2, 1, 1)


@pytest.mark.parametrize(
    ("activation", "expected_type"), [("prelu", nn.PReLU), ("identity", nn.Identity), ("keep", nn.ReLU)]
)
def test_untraceable_model_activation_options(activation, expected_type):
    binary = binarize.convert(Untraceable(), binarize.Policy(activation=activation), (torch.randn(1, 3, 16, 16),))
    assert type(binary.relu1) is expected_type and type(binary.relu3) is nn.ReLU
    if activation == "prelu":
        assert binary.relu1.num_parameters == 16


# ---------------------------------------------------------------------------------------------------
# Bi-Real shortcuts


def test_bireal_shortcut_around_every_binary_conv_of_a_resnet():
    torch.manual_seed(0)
    model = build("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    for mode in ("avgpool_conv", "zero_pad"):
        binary = binarize.convert(model, binarize.Policy(shortcuts="bireal", shortcut_downsample=mode), (x[:1],))
        convs = [n for n, m in binary.named_modules() if isinstance(m, ReCUConv2d)]
        shortcuts = binarize.binarize_meta(binary).shortcuts
        assert sorted(shortcuts) == sorted(convs) and len(convs) == 18
        assert sum(isinstance(m, BiRealShortcut) for m in binary.modules()) == len(convs)
        down = binary.get_submodule(shortcuts["layer2.0.conv1"])  # 16 -> 32 channels, stride 2
        assert (down.stride, down.in_channels, down.out_channels) == (2, 16, 32)
        assert (down.conv is not None) == (mode == "avgpool_conv")
        with torch.no_grad():
            assert binary.eval()(x).shape == (2, 10)
        report = binarize.inspect(binary)
        assert report.to_dict()["summary"]["shortcuts_added"] == 18
        if mode == "avgpool_conv":
            entry = next(e for e in report.layers if e.name == shortcuts["layer2.0.conv1"] + ".conv")
            assert (entry.decision, entry.reason) == ("float", "Bi-Real shortcut of layer2.0.conv1")


@pytest.mark.parametrize("mode", ["avgpool_conv", "zero_pad"])
@pytest.mark.parametrize("size", [12, 13])
def test_bireal_shortcut_is_added_to_the_batchnorm_output(mode, size):
    torch.manual_seed(0)
    model = TwoConv(stride=2).eval()  # conv2: 16 -> 32 channels, stride 2
    x = torch.randn(2, 3, size, size)
    policy = binarize.Policy(shortcuts="bireal", shortcut_downsample=mode)
    binary = binarize.convert(model, policy, (x[:1],)).eval()
    with torch.no_grad():
        assert binary(x).shape == model(x).shape
        binary.conv2.alpha.zero_()  # the binary conv now outputs 0 ...
        binary.bn2.reset_parameters()
        binary.bn2.reset_running_stats()  # ... and its BatchNorm passes 0 through: only the shortcut is left
        a = F.hardtanh(bn_eval(model.bn1, F.conv2d(x, model.conv1.weight, padding=1)))
        pooled = F.avg_pool2d(a, 2, 2, ceil_mode=True, count_include_pad=False)
        pad = (8, 8) if mode == "zero_pad" else (0, 16)  # avgpool_conv's 1x1 conv starts as a channel copy
        expected = _head(model, F.pad(pooled, (0, 0, 0, 0, *pad)))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)


def test_shared_shortcut_reuses_the_blocks_downsample():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    policy = binarize.Policy(shortcuts="bireal", shortcut_downsample="shared")
    binary = binarize.convert(model, policy, (x[:1],)).eval()
    avgpool = binarize.convert(model, binarize.Policy(shortcuts="bireal"), (x[:1],))
    shortcuts = binarize.binarize_meta(binary).shortcuts
    assert sorted(shortcuts) == sorted(binarize.binarize_meta(avgpool).shortcuts) and len(shortcuts) == 16
    for stage in (2, 3, 4):  # the downsampling blocks: their first conv's shortcut is the block's downsample
        assert shortcuts[f"layer{stage}.0.conv1"] == f"layer{stage}.0.downsample.1"
    assert not any(isinstance(m, BiRealShortcut) and m.conv is not None for m in binary.modules())
    added = [m.conv for m in avgpool.modules() if isinstance(m, BiRealShortcut) and m.conv is not None]
    extra = sum(conv.weight.numel() for conv in added)
    n_params = sum(p.numel() for p in binary.parameters())
    assert extra == 64 * 128 + 128 * 256 + 256 * 512
    assert n_params == sum(p.numel() for p in avgpool.parameters()) - extra
    seen = {}
    block = binary.get_submodule("layer3.0")
    hooks = [
        block.bn1.register_forward_hook(lambda m, i, o: seen.setdefault("bn1", o)),
        block.get_submodule("downsample.1").register_forward_hook(lambda m, i, o: seen.setdefault("downsample", o)),
        block.relu_sign_input.register_forward_hook(lambda m, i, o: seen.setdefault("sign_input", i[0])),
    ]
    with torch.no_grad():
        out = binary(x)
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 10)
    assert torch.equal(seen["sign_input"], seen["bn1"] + seen["downsample"])
    report = binarize.inspect(binary)
    assert report.to_dict()["summary"]["shortcuts_added"] == 16
    assert not any(e.reason.startswith("Bi-Real shortcut of") for e in report.layers)


def test_shared_shortcut_without_a_downsample_falls_back_to_avgpool_conv():
    torch.manual_seed(0)
    model = TwoConv(stride=2).eval()  # no downsample module: conv2 16 -> 32 channels, stride 2
    x = torch.randn(2, 3, 12, 12)
    shared = binarize.convert(model, binarize.Policy(shortcuts="bireal", shortcut_downsample="shared"), (x[:1],))
    avgpool = binarize.convert(model, binarize.Policy(shortcuts="bireal"), (x[:1],))
    shortcut = shared.get_submodule(binarize.binarize_meta(shared).shortcuts["conv2"])
    assert isinstance(shortcut, BiRealShortcut) and shortcut.mode == "avgpool_conv" and shortcut.conv is not None
    with torch.no_grad():
        assert torch.equal(shared.eval()(x), avgpool.eval()(x))


def test_bireal_with_zeroed_shortcut_equals_no_shortcut():
    torch.manual_seed(0)
    model = TwoConv(stride=2).eval()
    x = torch.randn(2, 3, 12, 12)
    plain = binarize.convert(model, binarize.Policy(), (x[:1],)).eval()
    bireal = binarize.convert(model, binarize.Policy(shortcuts="bireal"), (x[:1],)).eval()
    shortcut = bireal.get_submodule(binarize.binarize_meta(bireal).shortcuts["conv2"])
    with torch.no_grad():
        assert not torch.allclose(bireal(x), plain(x))
        shortcut.conv.weight.zero_()
        torch.testing.assert_close(bireal(x), plain(x))


def test_zero_pad_shortcut_is_not_added_where_channels_shrink():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    x = (torch.randn(1, 3, 8, 8),)
    zero_pad = binarize.convert(model, binarize.Policy(shortcuts="bireal", shortcut_downsample="zero_pad"), x)
    assert sorted(binarize.binarize_meta(zero_pad).shortcuts) == ["6"]
    avgpool = binarize.convert(model, binarize.Policy(shortcuts="bireal"), x)
    assert sorted(binarize.binarize_meta(avgpool).shortcuts) == ["3", "6"]
    assert zero_pad(x[0]).shape == avgpool(x[0]).shape == (1, 10)


# ---------------------------------------------------------------------------------------------------
# recalibrate_bn


class CalibNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(self.drop(x))))))


def _expected_stats(model: CalibNet, batches: list[torch.Tensor]):
    """Exact averages of the per-batch means and unbiased variances, dropout off, BN in batch-stat mode."""
    stats1, stats2 = [], []
    with torch.no_grad():
        for x in batches:
            h1 = model.conv1(x)
            h2 = model.conv2(F.relu(F.batch_norm(h1, None, None, model.bn1.weight, model.bn1.bias, True)))
            stats1.append((h1.mean(dim=(0, 2, 3)), h1.var(dim=(0, 2, 3))))
            stats2.append((h2.mean(dim=(0, 2, 3)), h2.var(dim=(0, 2, 3))))
    return [tuple(torch.stack(s).mean(0) for s in zip(*stats, strict=True)) for stats in (stats1, stats2)]


@pytest.mark.parametrize("training", [True, False])
def test_recalibrate_bn_reestimates_running_stats(training):
    torch.manual_seed(0)
    model = CalibNet().train(training)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    batches = [torch.randn(4, 3, 8, 8) * (i + 1) + i for i in range(3)]
    expected = _expected_stats(model, batches)
    targets = torch.zeros(4, dtype=torch.long)
    assert binarize.recalibrate_bn(model, [(x, targets) for x in batches]) is model
    for bn, (mean, var) in zip((model.bn1, model.bn2), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.num_batches_tracked == 3
    assert (model.bn1.momentum, model.bn2.momentum) == (0.3, None)
    assert all(m.training == training for m in model.modules())


def test_recalibrate_bn_restores_the_mode_of_each_module():
    model = CalibNet().train()
    model.bn2.eval()  # a frozen BatchNorm inside a training model
    binarize.recalibrate_bn(model, [torch.randn(4, 3, 8, 8)])
    assert model.bn2.num_batches_tracked == 1  # re-estimated too
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]


def test_recalibrate_bn_max_batches_and_plain_tensors():
    torch.manual_seed(0)
    model = CalibNet().eval()
    batches = [torch.randn(4, 3, 8, 8) + i for i in range(4)]
    expected = _expected_stats(model, batches[:2])
    binarize.recalibrate_bn(model, iter(batches), max_batches=2)
    torch.testing.assert_close(model.bn1.running_mean, expected[0][0])
    torch.testing.assert_close(model.bn2.running_var, expected[1][1])
    assert model.bn1.num_batches_tracked == 2 and not model.training


def test_recalibrate_bn_on_a_converted_model_changes_its_output():
    torch.manual_seed(0)
    model = TwoConv().eval()
    x = torch.randn(8, 3, 12, 12)
    binary = binarize.convert(model, example_inputs=(x[:1],)).eval()
    before = copy.deepcopy(binary.bn2.running_var)
    binarize.recalibrate_bn(binary, [x])
    assert not torch.allclose(binary.bn2.running_var, before)
    with torch.no_grad():
        a = F.hardtanh(F.batch_norm(model.conv1(x), None, None, model.bn1.weight, model.bn1.bias, True))
        h = sign_conv(binary.conv2, a)
    torch.testing.assert_close(binary.bn2.running_mean, h.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(binary.bn2.running_var, h.var(dim=(0, 2, 3)))


@pytest.mark.parametrize("kind", ["empty", "consumed"])
def test_recalibrate_bn_without_batches_raises_and_leaves_the_statistics_alone(kind):
    torch.manual_seed(0)
    model = CalibNet().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    if kind == "empty":
        source = []
    else:  # the README's pattern used twice: a generator is consumed by the first call
        source = (x for x in batches)
        binarize.recalibrate_bn(model, source)
        assert model.bn1.num_batches_tracked == 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(binarize.BinarizeError) as info:
        binarize.recalibrate_bn(model, source)
    assert str(info.value) == (
        "recalibrate_bn: no batches (the iterable is empty or already consumed); pass a list or a fresh iterable"
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert (model.bn1.momentum, model.bn2.momentum) == (0.3, None) and not model.training


def test_recalibrate_bn_restores_the_statistics_when_a_batch_fails():
    model = CalibNet().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        binarize.recalibrate_bn(model, [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 8, 8)])  # the second does not fit
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(binarize.BinarizeError, match=r"^recalibrate_bn takes an iterable of batches, got one tensor"):
        binarize.recalibrate_bn(model, torch.randn(4, 3, 8, 8))
    with pytest.raises(binarize.BinarizeError, match=r"^recalibrate_bn: max_batches must be >= 1"):
        binarize.recalibrate_bn(model, [torch.randn(4, 3, 8, 8)], max_batches=0)


def _last_layers(model: nn.Module, size: int) -> list[str]:
    binary = binarize.convert(model.eval(), example_inputs=torch.randn(1, 3, size, size))
    return [n for n, r in binarize.binarize_meta(binary).layers.items() if r.reason == "last layer"]


@pytest.mark.parametrize(
    ("spec", "size", "headless_last", "head"),
    [("cifar_resnet20", 32, "layer3.2.conv2", "linear"), ("resnet18", 64, "layer4.1.conv2", "fc")],
)
def test_last_layer_of_a_headless_model_is_the_final_conv(spec, size, headless_last, head):
    # Without a head, the convs of every block reach the output through the identity shortcuts of the blocks
    # after them (9 of 18 in cifar_resnet20 were "last"); only the final block's last conv feeds the output.
    torch.manual_seed(0)
    assert _last_layers(build(spec), size) == [head]
    assert _last_layers(timm.create_model(spec, pretrained=False, num_classes=0), size) == [headless_last]


def test_last_layers_of_a_model_with_two_outputs():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.body = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)
            self.box, self.cls = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 10, 1)

        def forward(self, x):
            y = self.body(torch.relu(self.stem(x)))
            return self.box(y), self.cls(y), y  # the features feed both heads: not a last layer

    assert _last_layers(TwoHeads(), 16) == ["box", "cls"]


def _assert_one_line_error(capfd, model: nn.Module, inputs, message: str) -> None:
    with pytest.raises(binarize.BinarizeError) as info:
        binarize.convert(model, example_inputs=inputs)
    assert str(info.value) == message
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # torch.fx's ShapeProp printed a 24-line traceback here


def test_example_inputs_with_the_wrong_channels_are_one_line_errors(capfd):
    model = build("cifar_resnet20").eval()
    _assert_one_line_error(
        capfd,
        model,
        torch.zeros(1, 1, 32, 32),
        "conv1 expects 3 input channels, the example input has 1; pass example inputs of the model's input size",
    )
    _assert_one_line_error(
        capfd,
        Untraceable(),  # the untraced path runs the model eagerly: the same message
        torch.zeros(1, 4, 16, 16),
        "conv1 expects 3 input channels, the example input has 4; pass example inputs of the model's input size",
    )
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    _assert_one_line_error(
        capfd,
        fixed,
        torch.zeros(1, 3, 16, 16),
        "3 expects 512 input features, its input has 2048 (size 1x2048); pass example inputs of the model's input size",
    )


def test_example_inputs_with_the_wrong_dimensions_are_one_line_errors(capfd):
    conv1d = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3))
    _assert_one_line_error(
        capfd,
        conv1d,
        torch.zeros(1, 3, 32, 32),
        "0 (Conv1d) expects 3-dimensional input (N, C, L), the example input is 1x3x32x32; pass example inputs of "
        "the model's input size",
    )
    with pytest.raises(binarize.BinarizeError, match=r"^example_inputs\[0\]: expected a tensor, got int$"):
        binarize.convert(TwoConv(), example_inputs=(3,))


def test_convert_takes_a_module_and_typed_options():
    with pytest.raises(binarize.BinarizeError) as info:
        binarize.convert(42)
    assert str(info.value) == "convert() takes an nn.Module, got int"
    with pytest.raises(binarize.BinarizeError, match=r"^convert\(\): policy must be a binarize.Policy, got dict$"):
        binarize.convert(TwoConv(), {"keep_first": False})
    with pytest.raises(binarize.BinarizeError, match=r"^convert\(\): layer must be a binarize.LayerOptions, got"):
        binarize.convert(TwoConv(), layer={"tau": 0.9})


def test_a_model_without_convolutions_converts_with_a_warning():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    binary = binarize.convert(model, example_inputs=torch.zeros(1, 3, 2, 2))
    assert binarize.binarize_meta(binary).warnings == ("no convolution found: nothing was binarized",)
    assert binarize.inspect(binary).summary.warnings == ("no convolution found: nothing was binarized",)
    assert binarize.inspect(binary).to_dict()["summary"]["warnings"] == ["no convolution found: nothing was binarized"]
    assert binarize.binarize_meta(binarize.convert(TwoConv(), example_inputs=torch.zeros(1, 3, 8, 8))).warnings == ()


def test_one_new_module_per_activation_call_site():
    # torchvision's BasicBlock calls its one `relu` module twice; each call that feeds a binary conv gets its
    # own PReLU (shared weights would tie two sites together), as timm's blocks with two ReLU modules do.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    policy = binarize.Policy(activation="prelu")
    for model in (torchvision.models.resnet18(num_classes=10), timm.create_model("resnet18", num_classes=10)):
        binary = binarize.convert(model.eval(), policy, x)
        prelus = [m for m in binary.modules() if isinstance(m, nn.PReLU)]
        replaced = binarize.binarize_meta(binary).activations_replaced
        assert len(prelus) == len({id(m) for m in prelus}) == len(replaced) == len(set(replaced)) == 16
        calls: list[nn.Module] = []
        for m in prelus:
            m.register_forward_hook(lambda m, *_, calls=calls: calls.append(m))
        with torch.no_grad():
            binary(x)
        assert len(calls) == 16 and len({id(m) for m in calls}) == 16  # one module per site, each called once
    assert replaced[:3] == ("act1", "layer1.0.act1", "layer1.0.act2")
    tv = binarize.binarize_meta(binarize.convert(torchvision.models.resnet18(num_classes=10), policy, x))
    assert tv.activations_replaced[:3] == ("relu", "layer1.0.relu#1", "layer1.0.relu#2")
