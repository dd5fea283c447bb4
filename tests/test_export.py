"""Tests of the deployable export (binarize.export): folding, the packed model and file, ONNX, QONNX, bench.

The packed model is compared with the simulated model run in float64 (an independent, accurate form of
the same network), the folding with a float64 reference of its formulas written here, the ONNX file with
onnxruntime and the QONNX file with qonnx's own executor. Models are small (CIFAR sizes) so that the whole
file runs in well under a minute on two cores.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import binarize
import binarize.deploy as bx
import binarize.zoo  # noqa: F401 - registers the CIFAR models in timm
from binarize.cli.main import app
from binarize.deploy import layer as packed_layer
from binarize.deploy.record import ExportError
from binarize.errors import BinarizeError, FileFormatError, TrainingError
from binarize.nn import LayerOptions, ReCUConv2d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------
# models


class ShortcutBeforeNorm(nn.Module):
    """``bn(conv(x) + x)``: the add between the binary conv and its BatchNorm blocks the fold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x) + x))
        return self.fc(x.mean((2, 3)))


class OddNet(nn.Module):
    """Odd channel counts, reflect padding, stride 2, dilation 2, a 5x5 kernel, a 1x1 conv with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 33, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(33)
        self.a = nn.Conv2d(33, 65, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.bn1 = nn.BatchNorm2d(65)
        self.b = nn.Conv2d(65, 31, 5, padding=4, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(31)
        self.c = nn.Conv2d(31, 70, 1, bias=True)
        self.fc = nn.Linear(70, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.a(x)))
        x = torch.relu(self.bn2(self.b(x)))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it is converted by module name."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        if x.sum() > -1e9:
            x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def make_odd_net(num_classes: int = 10) -> nn.Module:
    """The factory named as ``tests/test_export.py:make_odd_net``."""
    return OddNet()


def _float_model(spec: str) -> nn.Module:
    if spec == "shortcut-before-norm":
        return ShortcutBeforeNorm()
    if spec == "odd":
        return OddNet()
    if spec == "untraceable":
        return Untraceable()
    spec = spec.replace("tv:", "torchvision:")
    return binarize.create_model(spec, pretrained=False, num_classes=10)  # records the source


def _randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """Scales of both signs and random shifts (a negative BatchNorm scale flips the folded multiplier)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                signs = torch.where(torch.rand(m.weight.shape, generator=g) < 0.2, -1.0, 1.0)
                m.weight.uniform_(0.5, 1.5, generator=g).mul_(signs)
                m.bias.normal_(0.0, 0.5, generator=g)


def converted(
    spec: str, size: int = 32, policy: binarize.Policy | None = None, layer: LayerOptions | None = None
) -> nn.Module:
    """A converted model with randomised BatchNorms, re-estimated statistics and random activation biases."""
    torch.manual_seed(0)
    model = _float_model(spec).eval()
    binary = binarize.convert(model, policy, (torch.zeros(1, 3, size, size),), layer=layer)
    _randomise_norms(binary)
    g = torch.Generator().manual_seed(2)
    binarize.recalibrate_bn(binary, [torch.randn(8, 3, size, size, generator=g)])
    with torch.no_grad():
        for m in binary.modules():
            if isinstance(m, ReCUConv2d) and m.activation_bias is not None:
                m.activation_bias.normal_(0.0, 0.3, generator=g)
    return binary.eval()


def images(n: int = 4, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close_predictions(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Same top-1 and logits within ``rtol`` of the reference's scale."""
    scale = ref.abs().max().item()
    error = (out.double() - ref.double()).abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3g} vs scale {scale:.3g}"
    assert torch.equal(out.argmax(1), ref.argmax(1))


def reference(binary: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The simulated model in float64: the same network computed accurately."""
    with torch.no_grad():
        return copy.deepcopy(binary).double()(x.double())


# (spec, input size, policy, layer options)
ARCHITECTURES = [
    ("cifar_resnet20", 32, None, None),
    ("cifar_resnet20", 32, binarize.Policy(shortcuts="bireal", shortcut_downsample="zero_pad"), None),
    ("tv:resnet18", 32, binarize.Policy(shortcuts="bireal"), None),
    ("resnet18", 32, None, LayerOptions(activation_bias=True)),
    ("regnetx_002", 32, binarize.Policy(keep_grouped=False), None),  # grouped binary convs, fused BatchNormAct2d
    ("mobilenetv2_050", 32, None, None),  # depthwise convs stay float
    ("odd", 17, binarize.Policy(keep_first=False), LayerOptions(activation_bias=True)),
    ("tv:resnet18", 32, binarize.Policy(shortcuts="bireal", shortcut_downsample="shared"), None),
]


def _id(case) -> str:
    spec, _, policy, layer = case
    extra = []
    if policy is not None and policy.shortcuts != "none":
        extra.append("bireal" if policy.shortcut_downsample != "shared" else "bireal-shared")
    if policy is not None and not policy.keep_grouped:
        extra.append("grouped")
    if layer is not None and layer.activation_bias:
        extra.append("beta")
    return "-".join([spec, *extra])


@functools.cache
def _built(index: int) -> tuple[nn.Module, nn.Module]:
    """The converted and packed model of ``ARCHITECTURES[index]``, built once (tests do not modify them)."""
    spec, size, policy, layer = ARCHITECTURES[index]
    binary = converted(spec, size, policy, layer)
    return binary, bx.pack(binary)


@pytest.fixture(scope="module", params=range(len(ARCHITECTURES)), ids=[_id(c) for c in ARCHITECTURES])
def arch(request):
    binary, packed = _built(request.param)
    return binary, packed, images(3, ARCHITECTURES[request.param][1])


# ---------------------------------------------------------------------------------------------------------
# folding and the packed model


def test_packed_model_matches_the_simulated_one(arch):
    binary, packed, x = arch
    assert any(packed_layer.is_packed_layer(m) for m in packed.modules())
    assert not any(isinstance(m, ReCUConv2d) for m in packed.modules())
    with torch.no_grad():
        out = packed(x)
    assert out.dtype == torch.float32
    assert_close_predictions(out, reference(binary, x))


def test_every_kernel_gives_bitwise_the_same_output(arch):
    _, packed, x = arch
    outputs = []
    for kernel in packed_layer.available_kernels():
        packed_layer.set_kernel(packed, kernel)
        with torch.no_grad():
            outputs.append(packed(x))
    packed_layer.set_kernel(packed, None)
    assert all(torch.equal(o, outputs[0]) for o in outputs)


def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}

    def hook(name):
        def keep(module, args):
            seen[name] = args[0].detach()

        return keep

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_folded_layers_match_a_float64_reference_of_the_formulas(arch):
    """Each packed layer equals, on its real input, alpha * conv(sign(x + beta), sign(W - mean)) + bias followed
    by the folded BatchNorm, all in float64, to float32 rounding."""
    binary, packed, x = arch
    record = bx.packed_meta(packed)
    inputs = _capture_inputs(packed, list(record.layers), x)
    f64 = torch.float64
    for name, entry in record.layers.items():
        conv = binary.get_submodule(name)
        inp = inputs[name].to(f64)
        if conv.activation_bias is not None:
            inp = inp + conv.activation_bias.to(f64).view(1, -1, 1, 1)
        signs = torch.where(inp < 0, -1.0, 1.0).to(f64)
        w = conv.weight.detach().to(f64)
        centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
        weight = torch.where(centred < 0, -1.0, 1.0).to(f64)
        if conv.padding_mode != "zeros":
            ph, pw = conv.padding
            signs = F.pad(signs, (pw, pw, ph, ph), mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        acc = F.conv2d(signs, weight, None, conv.stride, padding, conv.dilation, conv.groups)
        z = acc * conv.alpha.detach().to(f64).view(1, -1, 1, 1)
        if conv.bias is not None:
            z = z + conv.bias.detach().to(f64).view(1, -1, 1, 1)
        if entry.norm is not None:
            bn = binary.get_submodule(entry.norm)
            mean, var = bn.running_mean.to(f64).view(1, -1, 1, 1), bn.running_var.to(f64).view(1, -1, 1, 1)
            z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.to(f64).view(1, -1, 1, 1)
            z = z + bn.bias.to(f64).view(1, -1, 1, 1)
        with torch.no_grad():
            out = packed.get_submodule(name)(inputs[name]).to(f64)
        tolerance = 1e-6 * z.abs().max().item() + 1e-6
        assert (out - z).abs().max().item() <= tolerance, name


def test_fold_record_of_a_cifar_resnet():
    binary = converted("cifar_resnet20")
    record = bx.packed_meta(bx.pack(binary))
    assert len(record.layers) == 18
    assert record.layers["layer1.0.conv1"].norm == "layer1.0.bn1"
    assert all(entry.norm is not None for entry in record.layers.values())
    assert record.float_folds == {}  # the stem comes before every binary layer: it keeps its BatchNorm
    assert set(record.folded_norms) == {e.norm for e in record.layers.values()}
    packed = bx.pack(binary)
    assert isinstance(packed.bn1, nn.BatchNorm2d) and isinstance(packed.get_submodule("layer1.0.bn1"), nn.Identity)


def test_float_convs_after_a_binary_layer_fold_their_batchnorm():
    binary, packed = _built(ARCHITECTURES.index(("tv:resnet18", 32, binarize.Policy(shortcuts="bireal"), None)))
    folds = bx.packed_meta(packed).float_folds
    assert folds == {f"layer{i}.0.downsample.0": f"layer{i}.0.downsample.1" for i in (2, 3, 4)}
    assert isinstance(packed.bn1, nn.BatchNorm2d)  # the stem's, before every binary layer
    unfolded = bx.pack(binary, fold_float_bn=False)
    assert bx.packed_meta(unfolded).float_folds == {}
    x = images()
    with torch.no_grad():
        assert_close_predictions(unfolded(x), packed(x), rtol=1e-5)


@pytest.mark.parametrize("spec", ["cifar_resnet20", "tv:resnet18"])
def test_the_first_binary_layer_sees_bitwise_the_simulated_input(spec):
    """The stem keeps its BatchNorm: up to the first sign the packed model computes exactly what the simulated
    one does, so a stem output within rounding of a threshold gives the same sign in both (where oneDNN
    gives the channels-last stem weight the NCHW one's summation order, as on the machines measured)."""
    binary = converted(spec, 32, binarize.Policy(shortcuts="bireal") if spec.startswith("tv") else None)
    packed = bx.pack(binary)
    x = images(3)
    stem = binary.get_submodule("conv1")
    nhwc = copy.deepcopy(stem)
    nhwc.weight.data = nhwc.weight.data.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if not torch.equal(stem(x), nhwc(x)):
            pytest.skip("oneDNN sums this stem's NCHW and channels-last convolutions in different orders here")
    first = "layer1.0.conv1"
    inputs = [_capture_inputs(model, [first], x)[first] for model in (binary.eval(), packed)]
    assert torch.equal(*inputs)


def test_a_shortcut_between_the_conv_and_its_norm_blocks_the_fold():
    binary = converted("shortcut-before-norm")
    packed = bx.pack(binary)
    entry = bx.packed_meta(packed).layers["conv"]
    assert entry.norm is None and "feeds 2 nodes" not in entry.note and "add" in entry.note
    assert isinstance(packed.bn, nn.BatchNorm2d)
    x = images()
    with torch.no_grad():
        assert_close_predictions(packed(x), reference(binary, x))


def test_an_untraced_model_is_exported_without_folding():
    binary = converted("untraceable")
    assert not binarize.binarize_meta(binary).traced
    packed = bx.pack(binary)
    record = bx.packed_meta(packed)
    assert record.layers["conv"].norm is None and record.layers["conv"].note == "the model was not traced"
    assert record.float_folds == {}
    x = images()
    with torch.no_grad():
        assert_close_predictions(packed(x), reference(binary, x))


def test_pack_leaves_the_source_model_alone():
    binary = converted("cifar_resnet20")
    before = {k: v.clone() for k, v in binary.state_dict().items()}
    bx.pack(binary)
    assert isinstance(binary.get_submodule("layer1.0.conv1"), ReCUConv2d)
    assert all(torch.equal(before[k], v) for k, v in binary.state_dict().items())


def test_an_activations_only_layer_is_refused_with_one_line():
    binary = converted("cifar_resnet20", layer=LayerOptions(binarize_weights=False))
    with pytest.raises(ExportError) as err:
        bx.pack(binary)
    assert str(err.value) == (
        "layer1.0.conv1 binarizes activations only (binarize_weights off): train the weight stage, "
        "or convert with binary weights"
    )


def test_a_packed_model_is_inference_only():
    packed = bx.pack(converted("cifar_resnet20"))
    assert not packed.training and not any(p.requires_grad for p in packed.parameters())
    with pytest.raises(TrainingError, match="inference-only") as err:
        packed.train()
    assert "\n" not in str(err.value)
    assert not packed.training and not any(m.training for m in packed.modules())
    packed.eval()
    packed.train(False)
    with pytest.raises(TrainingError):
        packed.get_submodule("layer1.0.conv1").train()
    assert binarize.binarize_meta(packed) is not None  # the conversion record survives packing


def test_packing_a_packed_model_is_refused():
    packed = bx.pack(converted("cifar_resnet20"))
    with pytest.raises(ExportError, match="already packed"):
        bx.pack(packed)
    with pytest.raises(BinarizeError, match="binarize.convert"):
        bx.pack(nn.Sequential(nn.Conv2d(3, 3, 1)))


# ---------------------------------------------------------------------------------------------------------
# the packed file


@pytest.fixture(scope="module")
def r20(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A converted CIFAR ResNet-20 and its training file."""
    binary = converted("cifar_resnet20")
    path = binarize.save(binary, tmp_path_factory.mktemp("r20") / "r20.safetensors", extra={"note": "x"})
    return binary, path


def test_packed_file_round_trip_is_bitwise(r20, tmp_path):
    binary, path = r20
    out = bx.export(path, tmp_path / "r20.packed.safetensors")
    assert bx.file_format(out) == "binarize-packed" and bx.file_format(path) == "binarize"
    loaded = bx.load_packed(out)
    packed = bx.pack(binarize.load(path))
    x = images(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(TrainingError):
        loaded.train()
    for model in (loaded, packed):  # float convs take channels-last weights, the packed layers' layout
        assert model.get_submodule("conv1").weight.is_contiguous(memory_format=torch.channels_last)
    header = bx.read_packed_header(out)
    assert header.source == {"spec": "cifar_resnet20", "num_classes": 10}
    assert header.packed.float_dtype == "fp32" and header.packed.layers == bx.packed_meta(packed).layers
    assert header.conversion.policy == binarize.binarize_meta(binary).policy
    assert header.run.extra == {"note": "x"} and binarize.run_record(loaded).extra == {"note": "x"}


def test_packed_file_holds_nothing_of_training(r20, tmp_path):
    from safetensors import safe_open

    _, path = r20
    out = bx.export(path, tmp_path / "p.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
        document = json.loads(f.metadata()["binarize"])
        bits = f.get_tensor("layer1.0.conv1.weight_bits")
    assert document["format"] == "binarize-packed" and document["format_version"] == 1
    assert not any(k.endswith((".tau", ".alpha")) for k in keys)
    assert "layer1.0.conv1.weight" not in keys and "layer1.0.bn1.running_mean" not in keys
    assert {"layer1.0.conv1.weight_bits", "layer1.0.conv1.mul", "layer1.0.conv1.add"} <= set(keys)
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (16, 3, 3, 8)  # 16 channels in one 64-bit word


def test_bit_layout_is_ohwi_lsb_first_with_1_for_minus_one():
    """The documented layout, checked by hand on one tap."""
    conv = ReCUConv2d(10, 2, 1, bias=False).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, 1, 1, 1, 1, 1, 1, -1, 1], [-1.0] * 10]).view(2, 10, 1, 1))
    layer = packed_layer.pack_layer(conv, None)
    bits = layer.weight_bits
    assert tuple(bits.shape) == (2, 1, 1, 8)
    # row 0: mean 0.6, so channels 1 and 8 are -1: bit 1 of byte 0, bit 0 of byte 1; the rest are padding
    assert bits[0, 0, 0].tolist() == [0b00000010, 0b00000001, 0, 0, 0, 0, 0, 0]
    assert bits[1, 0, 0].tolist() == [0] * 8  # every weight equals the mean: W - mean = 0 -> +1


def test_fp16_file_stores_the_float_layers_in_half(r20, tmp_path):
    _, path = r20
    out32 = bx.export(path, tmp_path / "a.safetensors")
    out16 = bx.export(path, tmp_path / "b.safetensors", float_dtype="fp16")
    from safetensors import safe_open

    with safe_open(str(out16), framework="pt") as f:
        assert f.get_tensor("linear.weight").dtype == torch.float16
        assert f.get_tensor("conv1.weight").dtype == torch.float16
        assert f.get_tensor("layer1.0.conv1.mul").dtype == torch.float32
        assert f.get_tensor("bn1.running_var").dtype == torch.float32  # the stem's BatchNorm, unfolded
    assert bx.read_packed_header(out16).packed.float_dtype == "fp16"
    loaded = bx.load_packed(out16)
    expected = bx.load_packed(out32)
    kept = {n for n, m in expected.named_modules() if packed_layer.is_packed_layer(m)}
    norms = {n for n, m in expected.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    kept |= norms  # normalisation layers stay float32
    with torch.no_grad():
        for key, value in expected.state_dict().items():
            if value.is_floating_point() and key.rpartition(".")[0] not in kept:
                value.copy_(value.half().float())
        x = images()
        assert torch.equal(loaded(x), expected(x))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_a_model_built_by_user_code_needs_model_to_load(tmp_path):
    torch.manual_seed(0)
    user = ShortcutBeforeNorm()
    binary = binarize.convert(user, example_inputs=(torch.zeros(1, 3, 32, 32),))
    out = bx.export(binary, tmp_path / "user.safetensors")
    with pytest.raises(FileFormatError, match="model=float_model"):
        bx.load_packed(out)
    loaded = bx.load_packed(out, model=ShortcutBeforeNorm())
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), bx.pack(binary)(x))


def test_a_model_from_a_file_spec_rebuilds(tmp_path):
    spec = f"{Path(__file__).resolve()}:make_odd_net"
    float_model = binarize.create_model(spec)
    binary = binarize.convert(float_model, example_inputs=(torch.zeros(1, 3, 17, 17),))
    out = bx.export(binary, tmp_path / "odd.safetensors")
    x = images(2, 17)
    with torch.no_grad():
        assert torch.equal(bx.load_packed(out)(x), bx.pack(binary)(x))


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text
    return text


def test_corrupt_and_truncated_packed_files_give_one_line(r20, tmp_path):
    _, path = r20
    good = bx.export(path, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    header_cut = tmp_path / "header-cut.safetensors"
    header_cut.write_bytes(data[:100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for bad in (truncated, header_cut, garbage, tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(FileFormatError) as err:
            bx.load_packed(bad)
        _one_line(err.value)
        with pytest.raises(FileFormatError):
            bx.file_format(bad)
    # valid safetensors, broken documents
    tensors = {"x": torch.zeros(1)}
    cases = {
        "not-json": "{nope",
        "no-format": json.dumps({"format_version": 1}),
        "newer": json.dumps({"format": "binarize-packed", "format_version": 99}),
        "no-packed": json.dumps({"format": "binarize-packed", "format_version": 1, "conversion": {}}),
    }
    for name, text in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad), metadata={"binarize": text})
        with pytest.raises(FileFormatError) as err:
            bx.load_packed(bad)
        message = _one_line(err.value)
        if name == "newer":
            assert "upgrade binarize" in message
    # a tensor of the wrong dtype where the packed bits belong
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["layer1.0.conv1.weight_bits"] = state["layer1.0.conv1.weight_bits"].float()
    wrong = tmp_path / "wrong-dtype.safetensors"
    save_file(state, str(wrong), metadata=metadata)
    with pytest.raises(FileFormatError, match="weight_bits is stored as torch.float32"):
        bx.load_packed(wrong)
    del state["layer1.0.conv1.weight_bits"]
    missing = tmp_path / "missing-tensor.safetensors"
    save_file(state, str(missing), metadata=metadata)
    with pytest.raises(FileFormatError, match="1 missing") as err:
        bx.load_packed(missing)
    _one_line(err.value)
    with pytest.raises(FileFormatError, match="training file, not a packed one"):
        bx.load_packed(path)


def test_sizes_are_a_small_fraction_of_the_float_file(tmp_path):
    """M5 on a torchvision ResNet-18 (10 classes): <= 0.10 of the float32 file, <= 0.065 with fp16."""
    policy = binarize.load_recipe("imagenet-resnet18").policy
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18(num_classes=10)
    binary = binarize.convert(float_model, policy, (torch.zeros(1, 3, 32, 32),))
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(tmp_path / "float.safetensors"))
    float_size = (tmp_path / "float.safetensors").stat().st_size
    packed = bx.pack(binary)
    size32 = bx.save_packed(packed, tmp_path / "p32.safetensors").stat().st_size
    size16 = bx.save_packed(packed, tmp_path / "p16.safetensors", float_dtype="fp16").stat().st_size
    assert size32 / float_size <= 0.10
    assert size16 / float_size <= 0.065
    bits = sum(m.weight_bits.numel() for _, m in packed_layer.packed_layers(packed))
    binary_weights = sum(m.weight.numel() for m in binary.modules() if isinstance(m, ReCUConv2d))
    assert bits * 8 == binary_weights  # every channel count here is a multiple of 64: no padding bits


# ---------------------------------------------------------------------------------------------------------
# export(): arguments


def test_export_checks_its_arguments(r20, tmp_path):
    binary, path = r20
    with pytest.raises(BinarizeError, match="did you mean 'onnx'"):
        bx.export(binary, tmp_path / "x.onnx", "onx")
    with pytest.raises(BinarizeError, match="float_dtype"):
        bx.export(binary, tmp_path / "x.safetensors", float_dtype="bf16")
    with pytest.raises(BinarizeError, match="applies to packed files"):
        bx.export(binary, tmp_path / "x.onnx", "onnx", float_dtype="fp16")
    out = binarize.export(binary, tmp_path / "x.safetensors")  # the public entry
    with pytest.raises(BinarizeError, match="already exists"):
        bx.export(binary, out)
    assert bx.export(bx.load_packed(out), out, force=True) == out  # a packed model exports again


# ---------------------------------------------------------------------------------------------------------
# ONNX and QONNX

ONNX_ARCHITECTURES = (0, 1, 3, 4, 6)


@pytest.fixture(scope="module", params=ONNX_ARCHITECTURES, ids=[_id(ARCHITECTURES[i]) for i in ONNX_ARCHITECTURES])
def onnx_case(request, tmp_path_factory):
    pytest.importorskip("onnx")
    _, packed = _built(request.param)
    path = bx.export(packed, tmp_path_factory.mktemp("onnx") / "model.onnx", "onnx")
    return packed, path, ARCHITECTURES[request.param][1]


def _ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_onnx_export_runs_in_onnxruntime_with_the_same_predictions(onnx_case):
    import onnx

    packed, path, size = onnx_case
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    session = _ort_session(path)
    for batch in (1, 3):  # a dynamic batch dimension
        x = images(batch, size, seed=batch)
        (out,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            assert_close_predictions(torch.from_numpy(out), packed(x))


def test_onnx_weights_are_stored_packed(onnx_case):
    import onnx
    from onnx import numpy_helper

    packed, path, _ = onnx_case
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, layer in packed_layer.packed_layers(packed):
        assert f"{name}.pm1_weight" not in inits
        bits = inits[f"{name}.pm1_weight_bits"]
        assert bits.dtype == "uint8" and bits.size == layer.out_channels * math.prod(layer.kernel_size) * math.ceil(
            layer.in_channels // layer.groups / 8
        )


def test_onnx_file_of_a_wide_layer_is_small(tmp_path):
    """The 3x3 256 -> 256 layer takes its bits (73.7 KB), not 2.36 MB of float weights."""
    pytest.importorskip("onnx")

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 256, 1)
            self.conv = nn.Conv2d(256, 256, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(256)
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(self.bn(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))

    binary = binarize.convert(Wide(), example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert list(bx.packed_meta(bx.pack(binary)).layers) == ["conv"]
    path = bx.export(binary, tmp_path / "wide.onnx", "onnx")
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert inits["conv.pm1_weight_bits"].nbytes == 256 * 256 * 9 // 8  # 73,728 bytes
    float_bytes = 4 * sum(v.size for k, v in inits.items() if v.dtype.kind == "f")
    assert float_bytes < 20_000  # the stem, the head and mul/add: no unpacked weights
    assert path.stat().st_size < 100_000  # the float layer alone would take 2.36 MB
    session = _ort_session(path)
    x = images(2, 8)
    with torch.no_grad():
        assert_close_predictions(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), bx.pack(binary)(x))


def test_onnx_sign_maps_zero_and_negative_zero_to_plus_one(tmp_path):
    """A binary first layer sees the raw input: exact zeros and -0.0 must give +1, as in binarize."""
    pytest.importorskip("onnx")
    binary = converted("odd", 9, binarize.Policy(keep_first=False, min_in_channels=1))
    assert "stem" in bx.packed_meta(bx.pack(binary)).layers
    path = bx.export(binary, tmp_path / "odd.onnx", "onnx")
    x = images(2, 9)
    x.view(-1)[::3] = 0.0
    x.view(-1)[1::3] = -0.0
    session = _ort_session(path)
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = bx.pack(binary)(x)
        flipped = bx.pack(binary)(torch.where(x == 0, -1e-3, x))  # what Sign(0) = 0 or -1 would be near
    assert_close_predictions(torch.from_numpy(out), expected)
    assert not torch.allclose(flipped, expected)


def test_qonnx_export_runs_in_qonnx_executor_with_the_same_predictions(tmp_path):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    for index in (0, 6):
        _, packed = _built(index)
        spec, size = ARCHITECTURES[index][:2]
        path = bx.export(packed, tmp_path / f"{spec}.qonnx.onnx", "qonnx")
        model = ModelWrapper(str(path))
        quants = model.get_nodes_by_op_type("BipolarQuant")
        assert len(quants) == 2 * len(bx.packed_meta(packed).layers)  # one on the weights, one on the input
        assert all(q.domain == "qonnx.custom_op.general" for q in quants)
        assert not model.get_nodes_by_op_type("Sign")
        x = images(1, size)
        out = execute_onnx(model, {model.graph.input[0].name: x.numpy()})[model.graph.output[0].name]
        with torch.no_grad():
            assert_close_predictions(torch.from_numpy(out), packed(x))


# ---------------------------------------------------------------------------------------------------------
# bench and the commands


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def test_bench_times_every_form(r20):
    _, path = r20
    result = bx.bench(path, threads=1, rounds=2, round_s=0.01, onnx=False)
    names = [row.name for row in result.rows]
    assert names == ["float", "simulated", *(f"packed[{k}]" for k in packed_layer.available_kernels())]
    assert result.row("float").ratio == 1.0 and all(r.min_ms <= r.median_ms <= r.max_ms for r in result.rows)
    assert "torch" in result.machine and "1 thread" in result.machine
    assert result.input_size == (3, 32, 32) and result.threads == 1
    assert torch.get_num_threads() == 1


def test_bench_command_json_with_onnxruntime(r20, tmp_path):
    pytest.importorskip("onnxruntime")
    _, path = r20
    packed = bx.export(path, tmp_path / "p.safetensors")
    result = run("bench", packed, "--threads", "1", "--rounds", "1", "--batch", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = [row["name"] for row in data["rows"]]
    assert {"float", "simulated", "onnxruntime float", "onnxruntime binary"} <= set(names)
    assert data["batch"] == 2 and data["machine"]


def test_export_command_writes_each_format(r20, tmp_path):
    _, path = r20
    result = run("export", path, "-o", tmp_path / "p.safetensors", "--float-dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and bx.read_packed_header(tmp_path / "p.safetensors").packed.float_dtype == "fp16"
    assert_one_line_error(run("export", path, "-o", tmp_path / "p.safetensors"), "--force")
    pytest.importorskip("onnx")
    result = run("export", path, "-o", tmp_path / "m.onnx", "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").stat().st_size < path.stat().st_size / 5


def test_export_command_refusals_are_one_line(tmp_path):
    binary = converted("cifar_resnet20", layer=LayerOptions(binarize_weights=False))
    path = binarize.save(binary, tmp_path / "stage1.safetensors")
    result = run("export", path, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert assert_one_line_error(result) == (
        "error: layer1.0.conv1 binarizes activations only (binarize_weights off): train the weight stage, "
        "or convert with binary weights"
    )
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    for command in (("export", truncated, "-o", tmp_path / "o.safetensors"), ("bench", truncated)):
        assert_one_line_error(run(*command), str(truncated))
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "o.safetensors").exists()


def test_no_temporary_files_are_left(r20, tmp_path):
    _, path = r20
    bx.export(path, tmp_path / "p.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# binarize.load, inspect and eval take packed files


def test_load_opens_packed_files(r20, tmp_path):
    binary, path = r20
    out = binarize.export(path, tmp_path / "p.safetensors")
    packed = binarize.load(out)
    assert any(packed_layer.is_packed_layer(m) for m in packed.modules())
    assert not any(isinstance(m, ReCUConv2d) for m in packed.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(packed(x), bx.load_packed(out)(x))
    with pytest.raises(BinarizeError, match="inference"):
        packed.train()


def test_inspect_shows_the_packed_layers_and_the_size_on_disk(r20, tmp_path):
    _, path = r20
    out = binarize.export(path, tmp_path / "p.safetensors")
    result = run("inspect", out, "--format", "json")
    assert result.exit_code == 0, result.output
    packed, source = json.loads(result.stdout), json.loads(run("inspect", path, "--format", "json").stdout)
    assert [(e["name"], e["decision"], e["shape"], e["macs"]) for e in packed["layers"]] == [
        (e["name"], e["decision"], e["shape"], e["macs"]) for e in source["layers"]
    ]
    assert packed["summary"]["binary_convs"] == source["summary"]["binary_convs"] == 18
    assert packed["file"] == {"path": str(out), "bytes": out.stat().st_size, "format": "binarize-packed"}
    assert packed["file"]["bytes"] < 0.1 * source["file"]["bytes"]
    table = run("inspect", out)
    assert table.exit_code == 0 and "file on disk (binarize-packed)" in table.stdout


def test_eval_of_a_packed_file_gives_the_top1_of_its_source(tiny_data, net_spec, tmp_path):
    float_model = binarize.create_model(net_spec)
    binary = binarize.convert(float_model, example_inputs=torch.zeros(1, 3, 16, 16))
    binarize.recalibrate_bn(binary, [torch.randn(8, 3, 16, 16) for _ in range(2)])
    source = binarize.save(binary, tmp_path / "m.safetensors")
    packed = binarize.export(source, tmp_path / "m.packed.safetensors")
    metrics = [binarize.evaluate_file(f, tiny_data, workers=0) for f in (source, packed)]
    assert metrics[0]["images"] == metrics[1]["images"] == 18
    assert metrics[0]["top1"] == metrics[1]["top1"] and metrics[0]["top5"] == metrics[1]["top5"]
    result = run("eval", packed, "--data", tiny_data, "--workers", "0", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == metrics[1]["top1"]
