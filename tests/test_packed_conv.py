"""The native binary convolution and ``PackedBinaryConv2d``: exact against independent float64 references.

Every kernel this machine can run (``kernel_info()["available"]``, the pure-torch ``torch`` kernel
included) is checked; the AVX-512 kernels also run emulated through SIMDe where its headers are installed
(slow). Run the file under each ``BINARIZE_KERNEL`` value, and with the extension missing, to check the
selection too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _shared_data import SHARED, extract_cifar10
from torch import nn

import binarize
from binarize.errors import ConfigError, TrainingError
from binarize.nn import PackedBinaryConv2d, ReCUConv2d, binary_sign, kernel_info
from binarize.runtime import KernelWarning, pack_signs, packed_bytes, unpack_signs
from binarize.runtime import kernel as K

KERNELS_HERE = kernel_info()["available"]  # native kernels that passed their self-test, then "torch"
NATIVE_HERE = [name for name in KERNELS_HERE if name != "torch"]
RESNET20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"
SOURCE = Path(K.__file__).with_name("bconv.c")


@pytest.fixture
def fresh_state():
    """Kernel selection forgotten before and after the test (the next use selects again)."""
    K._reset()
    yield
    K._reset()


def _input(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian input with exact zeros and negative zeros planted (both must binarize to +1)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    flat = x.view(-1)
    flat[::5] = 0.0
    flat[2::7] = -0.0
    return x


def _random_signs(o: int, c: int, kh: int, kw: int, seed: int) -> torch.Tensor:
    return torch.rand((o, c, kh, kw), generator=torch.Generator().manual_seed(seed)) < 0.5


def _reference_acc(x, signs, beta, stride, padding, dilation, mode, groups=1) -> torch.Tensor:
    """float64 conv of +-1 tensors: the exact integer accumulators (binary_sign, F.pad, F.conv2d)."""
    xb = x if beta is None else x + beta.view(1, -1, 1, 1)
    s = binary_sign(xb).double()
    w = signs.double() * 2 - 1
    if mode != "zeros":
        s = F.pad(s, (padding[1], padding[1], padding[0], padding[0]), mode=mode)
        padding = (0, 0)
    return F.conv2d(s, w, None, stride, padding, dilation, groups)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


# (batch, in, height, width, out, kernel, stride, padding, dilation, padding mode, activation bias)
ACC_CASES = [
    (1, 1, 5, 5, 3, 1, 1, 0, 1, "zeros", False),
    (3, 3, 7, 5, 4, 3, 1, 1, 1, "zeros", True),
    (1, 31, 9, 7, 5, 3, 2, 1, 1, "zeros", False),
    (3, 33, 6, 11, 7, 3, 1, 2, 2, "zeros", True),
    (1, 64, 5, 5, 9, 5, 1, 2, 1, "zeros", False),
    (1, 65, 7, 7, 6, 3, 2, 1, 1, "reflect", True),
    (3, 257, 5, 3, 5, 3, 1, 1, 1, "replicate", False),
    (1, 33, 6, 5, 4, 3, 1, 1, 1, "circular", True),
    (1, 32, 9, 9, 8, 1, 2, 0, 1, "zeros", False),
    (1, 5, 4, 4, 3, 3, 1, 3, 1, "zeros", False),  # rows and columns that lie wholly in the padding
    (2, 8, 6, 7, 5, (1, 3), (2, 1), (0, 1), 1, "zeros", False),
    (1, 2100, 3, 3, 3, 3, 1, 1, 1, "zeros", True),  # a reduction longer than a popcount byte can sum
    (3, 16, 8, 8, 16, 3, 1, 1, 1, "zeros", False),
]


def _pairs(*values):
    return [(v, v) if isinstance(v, int) else tuple(v) for v in values]


@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("case", ACC_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_accumulators_equal_float64_conv(kernel, case):
    n, c, h, w, o, k, stride, padding, dilation, mode, with_beta = case
    (kh, kw), stride, padding, dilation = _pairs(k, stride, padding, dilation)
    x = _input((n, c, h, w), seed=c * 7 + h)
    signs = _random_signs(o, c, kh, kw, seed=o + c)
    beta = None
    if with_beta:
        beta = torch.randn(c, generator=torch.Generator().manual_seed(3))
        x[:, :, 0, 0] = -beta  # x + beta == +0.0 exactly there
    layer = PackedBinaryConv2d.from_tensors(
        pack_signs(signs),
        torch.ones(o),
        torch.zeros(o),
        beta,
        in_channels=c,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=mode,
    )
    layer.kernel = kernel
    assert layer.backend == kernel
    got = layer(x)
    expected = _reference_acc(x, signs, beta, stride, padding, dilation, mode)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.double(), expected)


@pytest.mark.parametrize("kernel", KERNELS_HERE)
def test_every_input_layout_and_dtype_gives_the_same_output(kernel):
    x = _input((3, 40, 9, 8), seed=1)
    layer = _random_layer(40, 24, seed=2)
    layer.kernel = kernel
    expected = layer(x)
    assert _bitwise_equal(layer(x.contiguous(memory_format=torch.channels_last)), expected)
    wide = _input((3, 80, 9, 8), seed=1)
    wide[:, ::2] = x
    assert _bitwise_equal(layer(wide[:, ::2]), expected)  # a strided view
    assert _bitwise_equal(layer(x.double()), expected)  # binarized in float64, same signs here


def _random_layer(c: int, o: int, seed: int, *, k: int = 3, padding: int = 1, beta: bool = True) -> PackedBinaryConv2d:
    gen = torch.Generator().manual_seed(seed)
    return PackedBinaryConv2d.from_tensors(
        pack_signs(_random_signs(o, c, k, k, seed)),
        torch.randn(o, generator=gen),
        torch.randn(o, generator=gen),
        torch.randn(c, generator=gen) if beta else None,
        in_channels=c,
        padding=padding,
    )


def test_kernels_and_fallback_are_bitwise_equal():
    x = _input((2, 70, 11, 9), seed=5)
    x[0, 3, 4, 4] = float("nan")  # the packed kernels read NaN as +1, every one of them
    for layer in (_random_layer(70, 13, seed=6), _random_layer(70, 9, seed=7, k=1, padding=0, beta=False)):
        outputs = {}
        for kernel in KERNELS_HERE:
            layer.kernel = kernel
            outputs[kernel] = layer(x)
        for kernel, out in outputs.items():
            assert _bitwise_equal(out, outputs["torch"]), kernel
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("kernel", NATIVE_HERE)
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_thread_counts_give_bitwise_equal_outputs(kernel, flush_denormal):
    x = _input((3, 65, 13, 10), seed=8)
    x[:, :, ::3, ::2] = -1e-40  # a negative denormal: -1, or +1 where the caller flushes denormals to zero
    layers = [_random_layer(65, 21, seed=9), _random_layer(17, 40, seed=10, k=1, padding=0)]  # GEMM and direct
    before = torch.get_num_threads()
    outputs = []
    try:
        if flush_denormal and not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for layer in layers:
                layer.kernel = kernel
            outputs.append([layers[0](x), layers[1](x[:, :17])])
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)
    for out in outputs[1:]:
        assert all(_bitwise_equal(a, b) for a, b in zip(out, outputs[0], strict=True))
    # every worker thread compares as the calling thread does: a denormal is negative unless flushed
    acc = PackedBinaryConv2d.from_tensors(
        pack_signs(torch.ones(1, 65, 1, 1, dtype=torch.bool)), torch.ones(1), torch.zeros(1), in_channels=65
    )
    acc.kernel = kernel
    probe = torch.full((1, 65, 2, 2), -1e-40)
    assert torch.equal(acc(probe), torch.full((1, 1, 2, 2), -65.0))


def test_weight_layout_is_ohwi_lsb_first_one_is_minus_one():
    signs = torch.ones(2, 70, 1, 3, dtype=torch.bool)
    signs[0, 0, 0, 1] = False  # -1: bit 0 of byte 0 of tap 1
    signs[1, 9, 0, 2] = False  # bit 1 of byte 1 of tap 2
    signs[1, 69, 0, 0] = False  # bit 5 of byte 8 (the second 64-bit word)
    bits = pack_signs(signs)
    assert bits.shape == (2, 1, 3, 16) and bits.dtype == torch.uint8 and packed_bytes(70) == 16
    expected = torch.zeros_like(bits)
    expected[0, 0, 1, 0] = 1
    expected[1, 0, 2, 1] = 2
    expected[1, 0, 0, 8] = 32
    assert torch.equal(bits, expected)
    assert torch.equal(unpack_signs(bits, 70), signs.float() * 2 - 1)
    assert torch.equal(pack_signs(signs.float() * 2 - 1), bits)
    assert packed_bytes(64) == 8 and packed_bytes(65) == 16 and packed_bytes(1) == 8


def _recu_layer(c, o, *, bias, beta, mode="zeros", groups=1, stride=1, dilation=1, seed=0) -> ReCUConv2d:
    torch.manual_seed(seed)
    layer = ReCUConv2d(
        c,
        o,
        3,
        stride=stride,
        padding=1,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
        learn_activation_bias=beta,
    )
    with torch.no_grad():
        layer.alpha.uniform_(-0.2, 1.0)  # a negative scale too
        if bias:
            layer.bias.normal_()
        if beta:
            layer.activation_bias.normal_(0, 0.5)
    return layer.eval()


def _random_bn(o: int, seed: int) -> nn.BatchNorm2d:
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(o, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_(0, 3, generator=gen)
        bn.running_var.uniform_(0.2, 40, generator=gen)
        bn.weight.normal_(generator=gen)
        bn.bias.normal_(generator=gen)
    return bn.eval()


FOLD_CASES = [
    dict(bias=False, beta=False, bn=True),
    dict(bias=True, beta=True, bn=True),
    dict(bias=True, beta=False, bn=False),
    dict(bias=False, beta=True, bn=False, mode="reflect"),
    dict(bias=True, beta=True, bn=True, mode="circular", stride=2),
    dict(bias=False, beta=False, bn=True, mode="replicate", dilation=2),
    dict(bias=True, beta=True, bn=True, groups=2),
]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_from_recu_matches_the_simulated_layer_and_the_exact_fold(case):
    case = dict(case)
    with_bn = case.pop("bn")
    layer = _recu_layer(34, 18, seed=len(FOLD_CASES), **case)
    bn = _random_bn(18, seed=1) if with_bn else None
    packed = PackedBinaryConv2d.from_recu(layer, bn)
    assert packed.backend == ("torch" if layer.groups > 1 else kernel_info()["active"])
    x = _input((2, 34, 10, 9), seed=11)
    got = packed(x)
    with torch.no_grad():
        simulated = layer(x)
        if bn is not None:
            simulated = bn(simulated)
    # the float32 simulation rounds its sums of +-alpha: close, not equal
    scale = simulated.abs().max()
    assert (got - simulated).abs().max() <= 1e-5 * scale
    # exact reference in float64: alpha * acc + bias, then the BatchNorm
    signs = layer.sign_bits()
    beta = None if layer.activation_bias is None else layer.activation_bias.detach()
    acc = _reference_acc(x, signs, beta, layer.stride, layer.padding, layer.dilation, layer.padding_mode, layer.groups)
    alpha = layer.alpha.detach().double().view(1, -1, 1, 1)
    z = alpha * acc
    if layer.bias is not None:
        z = z + layer.bias.detach().double().view(1, -1, 1, 1)
    m, c = alpha, torch.zeros_like(alpha)
    if bn is not None:
        inv = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(1, -1, 1, 1)
        z = (z - bn.running_mean.double().view(1, -1, 1, 1)) * inv + bn.bias.double().view(1, -1, 1, 1)
        m, c = m * inv, (c - bn.running_mean.double().view(1, -1, 1, 1)) * inv
    # float32 mul and add (two representation errors, two roundings): a few units in the last place
    bound = 4 * 2.0**-24 * ((acc * m).abs() + c.abs() + z.abs()) + 1e-30
    assert ((got.double() - z).abs() <= bound).all()


def test_from_recu_refuses_float_weights_and_misfit_bn():
    layer = ReCUConv2d(8, 4, 3, binarize_weights=False)
    with pytest.raises(ConfigError, match="binarize_weights=False"):
        PackedBinaryConv2d.from_recu(layer)
    with pytest.raises(ConfigError, match="BatchNorm2d over 4"):
        PackedBinaryConv2d.from_recu(ReCUConv2d(8, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ConfigError, match="running statistics"):
        PackedBinaryConv2d.from_recu(ReCUConv2d(8, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ConfigError, match="takes a ReCUConv2d"):
        PackedBinaryConv2d.from_recu(nn.Conv2d(8, 4, 3))


def test_layer_is_inference_only_with_a_small_state():
    layer = PackedBinaryConv2d.from_recu(_recu_layer(20, 6, bias=True, beta=True), _random_bn(6, 2))
    assert not layer.training and list(layer.parameters()) == []
    with pytest.raises(TrainingError, match="inference-only"):
        layer.train()
    with pytest.raises(TrainingError):
        nn.Sequential(layer).train()
    layer.eval()
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight_bits": (torch.uint8, (6, 3, 3, 8)),
        "mul": (torch.float32, (6,)),
        "add": (torch.float32, (6,)),
        "activation_bias": (torch.float32, (20,)),
    }
    # a fresh layer from the hyper-parameters loads the state and computes the same
    fresh = PackedBinaryConv2d(20, 6, 3, padding=1, activation_bias=True)
    x = _input((1, 20, 7, 7), seed=4)
    before = fresh(x)
    fresh.load_state_dict(state)
    assert not _bitwise_equal(fresh(x), before)  # the kernel saw the new weights (no stale repacked copy)
    assert _bitwise_equal(fresh(x), layer(x))
    rebuilt = PackedBinaryConv2d.from_tensors(**state, in_channels=20, padding=1)
    assert _bitwise_equal(rebuilt(x), layer(x))
    halved = PackedBinaryConv2d.from_tensors(**state, in_channels=20, padding=1).half()  # constants stay float32
    assert halved.mul.dtype == torch.float32 and _bitwise_equal(halved(x), layer(x))
    with pytest.raises(ConfigError, match="mul has shape"):
        PackedBinaryConv2d.from_tensors(state["weight_bits"], torch.ones(5), state["add"], in_channels=20)


def _binary_convs(model: nn.Module):
    """(parent, conv name, name of its sibling BatchNorm convN -> bnN or None) of every ReCUConv2d."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, ReCUConv2d):
                bn = "bn" + name.removeprefix("conv") if name.startswith("conv") else None
                yield parent, name, bn if isinstance(getattr(parent, bn or "", None), nn.BatchNorm2d) else None


@pytest.fixture(scope="module")
def cifar_batch(tmp_path_factory) -> torch.Tensor:
    """20 real CIFAR-10 test images, normalised as the shared checkpoints expect."""
    from PIL import Image

    root = extract_cifar10(tmp_path_factory.mktemp("cifar"), per_class=2, splits=("test",))
    images = sorted((root / "test").glob("*/*.jpg"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize(
    "arch,policy", [("cifar_resnet20", {}), ("cifar_resnet20", {"shortcuts": "bireal"}), ("cifar_vgg_small", {})]
)
def test_packed_layers_match_a_converted_model_on_real_images(arch, policy, cifar_batch):
    weights = RESNET20 if arch == "cifar_resnet20" and RESNET20.is_file() else None
    torch.manual_seed(0)
    model = binarize.convert(binarize.create_model(arch, weights=weights), binarize.Policy(**policy))
    x = cifar_batch
    binarize.recalibrate_bn(model, [x])
    model.eval()
    convs = list(_binary_convs(model))
    assert len(convs) >= 5, f"{arch}: {len(convs)} binary convolutions"
    # what the simulated model feeds each binary conv, what the conv returns, what its BatchNorm takes and returns
    seen = {}

    def record(key):
        return lambda module, inputs, output: seen.__setitem__(key, (inputs[0], output))

    hooks = []
    for parent, conv, bn in convs:
        hooks.append(getattr(parent, conv).register_forward_hook(record((id(parent), conv))))
        if bn is not None:
            hooks.append(getattr(parent, bn).register_forward_hook(record((id(parent), bn))))
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    folded = 0
    for parent, conv, bn in convs:
        conv_in, conv_out = seen[(id(parent), conv)]
        if bn is not None and seen[(id(parent), bn)][0] is conv_out:  # the BatchNorm right after the conv
            packed, expected = (
                PackedBinaryConv2d.from_recu(getattr(parent, conv), getattr(parent, bn)),
                seen[(id(parent), bn)][1],
            )
            setattr(parent, bn, nn.Identity())
            folded += 1
        else:  # e.g. a max-pool between them: the BatchNorm stays
            packed, expected = PackedBinaryConv2d.from_recu(getattr(parent, conv)), conv_out
        got = packed(conv_in)  # on the real activations the simulated model feeds the layer
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), f"{conv} of {arch}"
        setattr(parent, conv, packed)
    assert folded >= 2
    # the whole packed model: the same predictions (a sign may flip where an activation lies within ~1e-6 of 0)
    with torch.no_grad():
        packed_logits = model(x)
    assert (packed_logits.argmax(1) == logits.argmax(1)).float().mean() >= 0.9
    close = ((packed_logits - logits).abs() <= 1e-4 * logits.abs().max()).all(dim=1)
    assert close.float().mean() >= 0.75


def test_fallback_without_the_extension_warns_and_gives_the_same_output(fresh_state, monkeypatch):
    layer = _random_layer(33, 7, seed=12)
    x = _input((2, 33, 6, 6), seed=13)
    native = layer(x)
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "_find_library", lambda: None)
    K._reset()
    with pytest.warns(KernelWarning, match=r"not built.*pip install -e \."):
        fallback = layer(x)
    assert _bitwise_equal(fallback, native)
    info = kernel_info()
    assert info["compiled"] is False and info["active"] == "torch" and info["available"] == ["torch"]
    assert layer.backend == "torch"


def test_a_stale_build_is_not_used(fresh_state, monkeypatch):
    if not kernel_info()["compiled"]:
        pytest.skip("the native extension is not built")
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "ABI_VERSION", K.ABI_VERSION + 1)
    K._reset()
    with pytest.warns(KernelWarning, match=r"stale build \(ABI"):
        assert kernel_info()["active"] == "torch"


def test_a_build_of_an_older_source_is_not_used(fresh_state, monkeypatch, tmp_path):
    if not kernel_info()["compiled"]:
        pytest.skip("the native extension is not built")
    assert K._library().source_sha256, "setup.py embeds the source's SHA-256"
    edited = tmp_path / "bconv.c"
    edited.write_bytes(SOURCE.read_bytes() + b"\n/* edited after the build */\n")
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "_SOURCE", edited)
    K._reset()
    with pytest.warns(KernelWarning, match="bconv.c changed since it was built"):
        assert kernel_info()["active"] == "torch"


def test_binarize_kernel_environment_variable(fresh_state, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert kernel_info()["active"] == "torch" and kernel_info()["requested"] == "torch"
    monkeypatch.setenv(K.ENV_VAR, "avx2")  # read once: a later change has no effect
    assert kernel_info()["active"] == "torch"
    for name in NATIVE_HERE:
        K._reset()
        monkeypatch.setenv(K.ENV_VAR, name.upper())
        assert kernel_info()["active"] == name
        assert _random_layer(8, 3, seed=0).backend == name
    K._reset()
    monkeypatch.setenv(K.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match=r"BINARIZE_KERNEL='fastest' is not a kernel; use one of: auto, vpopcntdq"):
        kernel_info()
    with pytest.raises(ConfigError):  # the same error at every use
        _random_layer(8, 3, seed=0)(torch.randn(1, 8, 4, 4))
    missing = [name for name in K.NATIVE_KERNELS if name not in NATIVE_HERE]
    if missing:
        K._reset()
        monkeypatch.setenv(K.ENV_VAR, missing[0])
        with pytest.raises(ConfigError, match=f"{missing[0]}.*(not available on this machine|not built)"):
            kernel_info()


def test_a_kernel_that_fails_its_self_test_is_rejected(fresh_state, monkeypatch):
    if not NATIVE_HERE:
        pytest.skip("no native kernel here")
    broken = NATIVE_HERE[0]
    real = K._native_conv

    def corrupt(name, *args, **kwargs):
        out = real(name, *args, **kwargs)
        if name == broken:
            out[-1, -1, -1, -1] += 1.0
        return out

    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "_native_conv", corrupt)
    K._reset()
    with pytest.warns(KernelWarning, match=f"the {broken} kernel failed its self-test"):
        info = kernel_info()
    assert broken in info["rejected"] and "differs from" in info["rejected"][broken]
    assert info["active"] != broken and broken not in info["available"]
    monkeypatch.setenv(K.ENV_VAR, broken)
    K._reset()
    with pytest.warns(KernelWarning), pytest.raises(ConfigError, match="failed its self-test"):
        kernel_info()


def test_torch_compile_fullgraph_matches_eager_with_one_custom_op():
    torch._dynamo.reset()
    layer = PackedBinaryConv2d.from_recu(_recu_layer(16, 12, bias=True, beta=True, mode="reflect"), _random_bn(12, 3))
    model = nn.Sequential(layer, nn.Hardtanh())
    x = _input((2, 16, 9, 9), seed=14)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    assert _bitwise_equal(torch.compile(model, fullgraph=True, backend=recording)(x), model(x))
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("binarize.packed_conv2d" in t for t in targets) == 1 and not any(
        "conv2d" in t and "binarize" not in t for t in targets
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces the op's fake implementation
    assert _bitwise_equal(compiled(x), model(x))
    compiled_layer = torch.compile(layer, fullgraph=True)  # Inductor: the op stays one extern call
    assert _bitwise_equal(compiled_layer(x), layer(x))
    torch._dynamo.reset()


def test_torch_export_sees_one_custom_op():
    layer = PackedBinaryConv2d.from_recu(_recu_layer(16, 12, bias=False, beta=True), _random_bn(12, 4))
    x = _input((1, 16, 8, 8), seed=15)
    program = torch.export.export(nn.Sequential(layer, nn.Hardtanh()), (x,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.binarize.packed_conv2d.default) == 1
    assert not [t for t in targets if "conv" in str(t) and t != torch.ops.binarize.packed_conv2d.default]
    assert _bitwise_equal(program.module()(x), torch.clamp(layer(x), -1, 1))


def test_import_loads_no_kernel_and_a_bad_kernel_name_is_one_line():
    probe = (
        "import json, os, sys, torch, binarize, binarize.nn\n"
        "before = 'binarize.runtime' in sys.modules\n"
        "from binarize.nn import PackedBinaryConv2d\n"
        "from binarize.errors import BinarizeError\n"
        "import binarize.runtime.kernel as k\n"
        "print(json.dumps([before, k._state.loaded]))\n"
        "try:\n"
        "    PackedBinaryConv2d(8, 4, 3)(torch.randn(1, 8, 5, 5))\n"
        "except BinarizeError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, K.ENV_VAR: "sse9"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert json.loads(lines[0]) == [False, False]  # importing binarize (and the layer) loads no library
    assert lines[1:] == [
        "BINARIZE_KERNEL='sse9' is not a kernel; use one of: auto, vpopcntdq, avx512bw, avx2, scalar, torch"
    ]


@pytest.mark.slow
def test_avx512_kernels_emulated_with_simde(fresh_state, monkeypatch, tmp_path):
    """Every path, AVX-512 included, built against SIMDe's portable intrinsics and run on this CPU."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not Path("/usr/include/simde/x86/avx512.h").is_file():
        pytest.skip("needs a C compiler and SIMDe's headers (apt-get install libsimde-dev)")
    library = tmp_path / "bconv_simde.so"
    subprocess.run(
        [
            compiler,
            "-O1",
            "-ffp-contract=off",
            "-std=c11",
            "-fPIC",
            "-pthread",
            "-shared",
            "-DBCONV_SIMDE",
            str(SOURCE),
            "-o",
            str(library),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "_find_library", lambda: library)
    K._reset()
    info = kernel_info()
    assert info["available"] == [*K.NATIVE_KERNELS, "torch"] and info["rejected"] == {}
    for case in ACC_CASES:
        for kernel in K.NATIVE_KERNELS:
            test_accumulators_equal_float64_conv(kernel, case)
    x = _input((2, 70, 11, 9), seed=5)
    layer = _random_layer(70, 13, seed=6)
    outputs = []
    for kernel in K.KERNELS:
        layer.kernel = kernel
        outputs.append(layer(x))
    assert all(_bitwise_equal(out, outputs[-1]) for out in outputs)


def test_first_use_inside_inference_mode():
    """The kernel's first use (its self-test included) may happen under torch.inference_mode, whose
    tensors have no version counter for the weight caches."""
    code = (
        "import torch\n"
        "from binarize.nn import PackedBinaryConv2d, ReCUConv2d\n"
        "conv = ReCUConv2d.from_float(torch.nn.Conv2d(70, 8, 3, padding=1)).eval()\n"
        "with torch.inference_mode():\n"
        "    layer = PackedBinaryConv2d.from_recu(conv)\n"
        "    y, z = layer(torch.randn(2, 70, 9, 9)), layer(torch.randn(1, 70, 5, 5))\n"
        "assert y.shape == (2, 8, 9, 9) and z.shape == (1, 8, 5, 5)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
