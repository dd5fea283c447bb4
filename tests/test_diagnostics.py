"""Tests of binarize.diagnostics: each figure against an independent float64 reference written here (numpy),
on real architectures and the pretrained CIFAR ResNet-20; the sign tracker and its resumable state; the model
wrappers; the flags, one test per rule; diagnostics.jsonl; the plots; the table; the ``diagnose`` command."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import typer
from _shared_data import SHARED, extract_cifar10
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import binarize
from binarize.diagnostics import (
    DIAGNOSTICS,
    FLAGS,
    RECORD_KEYS,
    History,
    SignTracker,
    append_records,
    binary_layers,
    diagnose,
    layer_flags,
    read_history,
    trim_history,
)
from binarize.diagnostics import flags as flag_rules
from binarize.diagnostics.tracker import _pack, _unpack
from binarize.errors import BinarizeError, ConfigError, FileFormatError, TrainingError
from binarize.files import RunRecord
from binarize.nn import ReCUConv2d

PRETRAINED_R20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"
C = 2.0 * math.sqrt(2.0)
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------
# The float64 reference, from the formulas of docs/diagnostics.md (numpy, not binarize's code)
# ---------------------------------------------------------------------------------------------------------


def ref_w1(weight: torch.Tensor) -> np.ndarray:
    """W1 = (W - mean_o) * 2 sqrt(2) / sqrt(unbiased var_o + 1e-5), one row per output channel."""
    w = weight.detach().cpu().double().numpy().reshape(weight.shape[0], -1)
    centred = w - w.mean(axis=1, keepdims=True)
    var = (centred**2).sum(axis=1, keepdims=True) / (w.shape[1] - 1)
    return centred * C / np.sqrt(var + EPS)


def ref_bits(weight: torch.Tensor) -> np.ndarray:
    """The deployed signs: W - mean_o >= 0, in float32 as the layer deploys them (float64 could round a
    weight next to its channel mean the other way)."""
    w = weight.detach().cpu().float().reshape(weight.shape[0], -1)
    return (w - w.mean(dim=1, keepdim=True) >= 0).numpy()


def ref_entropy_bits(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def ref_weight_figures(layer: ReCUConv2d) -> dict[str, float]:
    w1 = ref_w1(layer.weight)
    tau = float(layer.tau)
    q = -np.abs(w1).mean() * math.log(2 - 2 * tau)
    a = np.abs(w1).mean(axis=1, keepdims=True)
    bits = ref_bits(layer.weight)
    s = np.where(bits, 1.0, -1.0)
    return {
        "clipped": float((np.abs(w1) > q).mean()),
        "clipped_nominal": 2 * (1 - tau),
        "quant_error": float(((w1 - a * s) ** 2).sum() / (w1**2).sum()),
        "entropy": float(ref_entropy_bits(bits.mean(axis=1)).mean()),
        "weight_shape": float(w1.std() / np.abs(w1).mean()),
    }


def ref_saturation(inputs: list[torch.Tensor], beta: torch.Tensor | None) -> float:
    """Share of |A0| >= 1, A0 = (x + beta) / sqrt(unbiased per-sample var over C,H,W + 1e-5)."""
    saturated = total = 0
    for x in inputs:
        a = x.detach().double().numpy()
        if beta is not None:
            a = a + beta.detach().double().numpy().reshape(1, -1, 1, 1)
        flat = a.reshape(a.shape[0], -1)
        var = flat.var(axis=1, ddof=1).reshape(-1, 1, 1, 1)
        saturated += int((np.abs(a / np.sqrt(var + EPS)) >= 1).sum())
        total += a.size
    return saturated / total


def captured_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The input of every binary layer on each batch, in eval mode (the test's own hooks)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].clone()))
        for name, layer in binary_layers(model)
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.train(was_training)
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A float stem, two convs that become binary, a float head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = (
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
        )
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_binary(seed: int = 0, activation_bias: bool = False, **policy) -> nn.Module:
    torch.manual_seed(seed)
    layer = binarize.LayerOptions(activation_bias=activation_bias)
    return binarize.convert(Tiny(), binarize.Policy(**policy), torch.zeros(1, 3, 12, 12), layer=layer)


def perturb(model: nn.Module, scale: float, seed: int) -> None:
    """Moves every latent weight a little (a stand-in for an optimizer step)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in binary_layers(model):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * scale * layer.weight.std())


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, nn.Module]:
    """Two real architectures of the ReCU paper, converted (random float weights, seeded), tau varied per layer."""
    out = {}
    for name in ("cifar_resnet20", "cifar_vgg_small"):
        torch.manual_seed(0)
        model = binarize.convert(binarize.create_model(name), example_inputs=torch.zeros(1, 3, 32, 32))
        for i, (_, layer) in enumerate(binary_layers(model)):
            layer.tau.fill_(0.85 + 0.14 * i / 20)
        out[name] = model
    return out


# ---------------------------------------------------------------------------------------------------------
# Weight figures
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_vgg_small"])
def test_weight_figures_match_the_float64_reference(zoo_models, arch):
    model = zoo_models[arch]
    diagnosis = diagnose(model)
    layers = dict(binary_layers(model))
    assert [d.layer for d in diagnosis] == list(layers)
    for entry in diagnosis:
        ref = ref_weight_figures(layers[entry.layer])
        for key, value in ref.items():
            assert getattr(entry, key) == pytest.approx(value, rel=1e-9, abs=1e-12), (entry.layer, key)
        assert entry.tau == pytest.approx(float(layers[entry.layer].tau), abs=0)


def test_entropy_is_the_mean_over_channels_of_each_channels_sign_entropy():
    """Channels skewed alternately left and right: balanced over the layer, unbalanced in every channel."""
    torch.manual_seed(0)
    layer = ReCUConv2d(32, 8, 3, bias=False)
    skewed = torch.distributions.Exponential(1.0).sample((8, 32, 3, 3))
    with torch.no_grad():
        layer.weight.copy_(skewed * torch.tensor([1.0, -1.0] * 4).view(8, 1, 1, 1))
    entry = diagnose(nn.Sequential(layer))[0]
    bits = ref_bits(layer.weight)
    assert abs(bits.mean() - 0.5) < 0.01  # a per-layer entropy would be ~1 bit
    expected = ref_entropy_bits(bits.mean(axis=1)).mean()
    assert entry.entropy == pytest.approx(expected, rel=1e-12)
    assert entry.entropy < 0.97  # an exponential has P(x > mean) = 1/e: H(0.37) = 0.95


@pytest.mark.parametrize(
    ("sample", "shape", "quant_error"),
    [
        ("laplace", math.sqrt(2.0), 0.5),
        ("gaussian", math.sqrt(math.pi / 2), 1 - 2 / math.pi),
    ],
)
def test_figures_of_laplace_and_gaussian_weights(sample, shape, quant_error):
    """The documented reference values: a Laplace layer clips 2(1 - tau), a Gaussian one 33.7 % at tau 0.85."""
    torch.manual_seed(1)
    layer = ReCUConv2d(256, 256, 3, bias=False)
    dist_ = torch.distributions.Laplace(0.0, 1.0) if sample == "laplace" else torch.distributions.Normal(0.0, 1.0)
    with torch.no_grad():
        layer.weight.copy_(dist_.sample(layer.weight.shape))
    layer.tau.fill_(0.85)
    entry = diagnose(nn.Sequential(layer))[0]
    assert entry.weight_shape == pytest.approx(shape, abs=0.01)
    assert entry.quant_error == pytest.approx(quant_error, abs=0.01)
    assert entry.clipped_nominal == pytest.approx(0.30, abs=1e-6)
    # Gaussian: b = mean|w| = sigma sqrt(2/pi), so Q = -ln(0.3) b = 0.961 sigma and P(|w| > Q) = 0.337
    q_over_sigma = -math.log(0.3) * math.sqrt(2 / math.pi)
    expected = 0.30 if sample == "laplace" else math.erfc(q_over_sigma / math.sqrt(2))
    assert entry.clipped == pytest.approx(expected, abs=0.003)
    assert entry.entropy == pytest.approx(1.0, abs=0.01)


def test_tau_one_clips_nothing():
    model = tiny_binary()
    for _, layer in binary_layers(model):
        layer.tau.fill_(1.0)
    for entry in diagnose(model):
        assert entry.clipped == 0.0 and entry.clipped_nominal == 0.0


# ---------------------------------------------------------------------------------------------------------
# Saturation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_vgg_small"])
def test_saturation_matches_the_reference(zoo_models, arch):
    model = zoo_models[arch]
    torch.manual_seed(2)
    batches = [torch.randn(3, 3, 32, 32) for _ in range(3)]
    inputs = captured_inputs(model, batches[:2])
    diagnosis = diagnose(model, batches, max_batches=2)
    for entry in diagnosis:
        assert entry.saturation == pytest.approx(ref_saturation(inputs[entry.layer], None), abs=1e-12)


def test_saturation_includes_the_learned_threshold_and_takes_tuples():
    model = tiny_binary(activation_bias=True)
    with torch.no_grad():
        for _, layer in binary_layers(model):
            layer.activation_bias.normal_(0.0, 2.0)
    torch.manual_seed(3)
    batches = [(torch.randn(4, 3, 12, 12), torch.zeros(4)) for _ in range(2)]
    inputs = captured_inputs(model, [b[0] for b in batches])
    layers = dict(binary_layers(model))
    for entry in diagnose(model, batches):
        beta = layers[entry.layer].activation_bias
        assert entry.saturation == pytest.approx(ref_saturation(inputs[entry.layer], beta), abs=1e-12)
        assert entry.saturation != pytest.approx(ref_saturation(inputs[entry.layer], None), abs=1e-3)


def test_saturation_reads_at_most_max_batches():
    model = tiny_binary()
    read = []

    def batches():
        for i in range(10):
            read.append(i)
            yield torch.randn(2, 3, 12, 12)

    diagnose(model, batches(), max_batches=3)
    assert read == [0, 1, 2]


def test_saturation_is_none_for_a_layer_the_batches_never_reach():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ReCUConv2d(8, 8, 3, padding=1)
            self.b = ReCUConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.a(x)

    diagnosis = diagnose(Skip(), [torch.randn(2, 8, 5, 5)])
    assert diagnosis["a"].saturation is not None and diagnosis["b"].saturation is None


def test_diagnose_leaves_the_model_as_it_was():
    model = tiny_binary()
    model.train()
    model.bn1.eval()  # a frozen part of a training model stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    diagnose(model, [torch.randn(4, 3, 12, 12)], tracker=SignTracker())
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer._forward_pre_hooks for _, layer in binary_layers(model))


# ---------------------------------------------------------------------------------------------------------
# diagnose(): records, wrappers, errors
# ---------------------------------------------------------------------------------------------------------


def test_records_have_exactly_the_documented_keys_and_none_where_unmeasured():
    model = tiny_binary()
    records = diagnose(model).to_records(0)
    assert [list(r) for r in records] == [list(RECORD_KEYS)] * 2
    assert RECORD_KEYS == (
        "epoch", "layer", "clipped", "clipped_nominal", "flip_rate", "changed_from_start", "never_flipped",
        "saturation", "quant_error", "entropy", "weight_shape",
    )  # fmt: skip
    assert [r["layer"] for r in records] == ["conv1", "conv2"]
    for r in records:
        assert r["epoch"] == 0
        assert r["saturation"] is None and r["flip_rate"] is None and r["never_flipped"] is None
        json.dumps(r, allow_nan=False)
    tracked = diagnose(model, [torch.randn(2, 3, 12, 12)], tracker=SignTracker()).to_records(0)
    assert all(r["saturation"] is not None and r["changed_from_start"] == 0.0 for r in tracked)
    assert all(r["flip_rate"] is None and r["never_flipped"] == 1.0 for r in tracked)  # nothing to compare yet


def test_diagnose_skips_layers_with_float_weights_and_needs_a_binary_one():
    model = tiny_binary()
    model.conv2.binarize_weights = False
    assert [d.layer for d in diagnose(model)] == ["conv1"]
    model.conv1.binarize_weights = False
    with pytest.raises(ConfigError, match="no binary layer"):
        diagnose(model)
    with pytest.raises(ConfigError, match="no binary layer"):
        diagnose(Tiny())
    with pytest.raises(ConfigError, match="max_batches"):
        diagnose(tiny_binary(), max_batches=0)


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrapped(model: nn.Module, how: str) -> nn.Module:
    if how == "dataparallel":
        return nn.DataParallel(model)
    if how == "compile":
        return torch.compile(model)
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return torch.compile(nn.DataParallel(model))


@pytest.mark.parametrize("how", ["dataparallel", "compile", "ddp", "compile+dataparallel"])
def test_diagnose_unwraps_ddp_and_compile(how, request):
    if "ddp" in how:
        request.getfixturevalue("process_group")
    model = tiny_binary()
    batches = [torch.randn(2, 3, 12, 12)]
    plain_tracker, wrapped_tracker = SignTracker(model), SignTracker(model)
    perturb(model, 0.3, seed=0)
    plain = diagnose(model, batches, tracker=plain_tracker)
    wrapped = diagnose(_wrapped(model, how), batches, tracker=wrapped_tracker)
    assert wrapped == plain
    assert [d.layer for d in wrapped] == ["conv1", "conv2"]


# ---------------------------------------------------------------------------------------------------------
# SignTracker
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 2304, 12345])
def test_bit_packing_round_trips(numel):
    bits = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = _pack(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(_unpack(packed, numel), bits)
    assert torch.equal(packed, torch.from_numpy(np.packbits(bits.numpy())))  # numpy's bit order


def test_sign_figures_match_the_reference_over_several_snapshots():
    model = tiny_binary()
    layers = dict(binary_layers(model))
    snapshots = [{name: ref_bits(layer.weight).ravel() for name, layer in layers.items()}]
    tracker = SignTracker(model)
    for step in range(4):
        perturb(model, 0.4, seed=step)
        figures = tracker.update(model)
        snapshots.append({name: ref_bits(layer.weight).ravel() for name, layer in layers.items()})
        for name in layers:
            history = np.stack([s[name] for s in snapshots])
            flips = history[1:] != history[:-1]
            f = figures[name]
            assert f.flip_rate == pytest.approx(flips[-1].mean(), abs=1e-15)
            assert f.changed_from_start == pytest.approx((history[-1] != history[0]).mean(), abs=1e-15)
            assert f.never_flipped == pytest.approx((~flips.any(axis=0)).mean(), abs=1e-15)
            assert 0 < f.flip_rate < 0.5
    assert tracker.snapshots == 5


def test_a_weight_that_flips_back_has_flipped():
    layer = ReCUConv2d(8, 1, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([3.0, -3.0, 2.0, -2.0, 1.0, -1.0, 0.5, -0.5]).view(1, 8, 1, 1))
    model = nn.Sequential(layer)
    tracker = SignTracker(model)
    with torch.no_grad():
        layer.weight[0, 0] = -3.0  # the mean stays 0 while one weight flips, then flips back
        layer.weight[0, 1] = 3.0
    first = tracker.update(model)["0"]
    with torch.no_grad():
        layer.weight[0, 0] = 3.0
        layer.weight[0, 1] = -3.0
    second = tracker.update(model)["0"]
    assert (first.flip_rate, first.changed_from_start, first.never_flipped) == (0.25, 0.25, 0.75)
    assert (second.flip_rate, second.changed_from_start, second.never_flipped) == (0.25, 0.0, 0.75)


def test_tracker_state_round_trip_continues_exactly(tmp_path):
    straight = tiny_binary()
    resumed = tiny_binary()
    tracker = SignTracker(straight)
    first = SignTracker(resumed)
    expected = []
    for step in range(4):
        perturb(straight, 0.3, seed=step)
        expected.append(tracker.update(straight))
    for step in range(2):
        perturb(resumed, 0.3, seed=step)
        first.update(resumed)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = SignTracker()
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert second.snapshots == 3 and second.layers == ["conv1", "conv2"]
    for step in range(2, 4):
        perturb(resumed, 0.3, seed=step)
        assert second.update(resumed) == expected[step]


def test_tracker_errors():
    tracker = SignTracker(tiny_binary())
    state = tracker.state_dict()
    other = binarize.convert(Tiny(width=24), example_inputs=torch.zeros(1, 3, 12, 12))
    with pytest.raises(TrainingError, match="conv1.*new SignTracker"):
        tracker.update(other)
    with pytest.raises(TrainingError, match="version"):
        SignTracker().load_state_dict({**state, "version": 99})
    broken = {**state, "layers": {"conv1": {**state["layers"]["conv1"], "start": torch.zeros(3, dtype=torch.uint8)}}}
    with pytest.raises(TrainingError, match="corrupt"):
        SignTracker().load_state_dict(broken)


def test_a_layer_is_tracked_from_when_its_weights_become_binary():
    model = tiny_binary()
    model.conv2.binarize_weights = False
    tracker = SignTracker(model)
    assert tracker.layers == ["conv1"]
    perturb(model, 0.3, seed=0)
    model.conv2.binarize_weights = True
    figures = tracker.update(model)
    assert figures["conv1"].flip_rate > 0
    assert figures["conv2"].flip_rate is None and figures["conv2"].never_flipped == 1.0


# ---------------------------------------------------------------------------------------------------------
# The pretrained ResNet-20 on real CIFAR-10 images
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_test_images(tmp_path_factory) -> torch.Tensor:
    from PIL import Image

    root = extract_cifar10(tmp_path_factory.mktemp("cifar"), per_class=3, splits=("test",))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = []
    for path in sorted(root.glob("test/*/*.jpg")):
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()) / 255
        images.append((pixels.permute(2, 0, 1) - mean) / std)
    return torch.stack(images)


def test_pretrained_resnet20_on_real_images(cifar_test_images):
    if not PRETRAINED_R20.is_file():
        pytest.skip(f"{PRETRAINED_R20} is absent (the shared models are not mounted)")
    float_model = binarize.create_model("cifar_resnet20", weights=PRETRAINED_R20)
    model = binarize.convert(float_model, binarize.Policy(shortcuts="none"), torch.zeros(1, 3, 32, 32))
    batches = [cifar_test_images[:15], cifar_test_images[15:]]
    inputs = captured_inputs(model, batches)
    diagnosis = diagnose(model, batches)
    layers = dict(binary_layers(model))
    assert len(diagnosis) == 18
    for entry in diagnosis:
        ref = ref_weight_figures(layers[entry.layer])
        for key, value in ref.items():
            assert getattr(entry, key) == pytest.approx(value, rel=1e-9), (entry.layer, key)
        assert entry.saturation == pytest.approx(ref_saturation(inputs[entry.layer], None), abs=1e-12)
        # pretrained weights are near-Gaussian: tau = 0.85 clips about 1/3, not the nominal 30 %
        assert 0.28 < entry.clipped < 0.36 and 1.2 < entry.weight_shape < 1.45
        assert 0.2 < entry.saturation < 0.8


# ---------------------------------------------------------------------------------------------------------
# Flags: one test per rule
# ---------------------------------------------------------------------------------------------------------


def rec(epoch: int | None = 3, **values) -> dict:
    base = dict.fromkeys(RECORD_KEYS)
    base.update(epoch=epoch, layer="layer1.0.conv1", clipped=0.2, clipped_nominal=0.2, flip_rate=0.01)
    base.update(changed_from_start=0.1, never_flipped=0.9, saturation=0.3, quant_error=0.4, entropy=1.0)
    base.update(weight_shape=1.3)
    base.update(values)
    return base


def names(history) -> list[str]:
    return [f.name for f in layer_flags(history)]


def test_a_healthy_layer_raises_no_flag():
    history = [rec(1, flip_rate=0.03, changed_from_start=0.03), rec(2, flip_rate=0.01, changed_from_start=0.035)]
    assert names(history) == []
    assert names([]) == []
    assert names([dict.fromkeys(RECORD_KEYS)]) == []  # nothing measured: nothing flagged


def test_flag_over_clipped():
    assert names([rec(clipped=0.38, clipped_nominal=0.3)]) == ["over-clipped"]
    assert names([rec(clipped=0.37, clipped_nominal=0.3)]) == []  # 1.23x
    assert names([rec(clipped=0.01, clipped_nominal=0.0)]) == ["over-clipped"]  # tau = 1 clips nothing
    assert names([rec(clipped=None)]) == []


def test_flag_frozen():
    assert names([rec(2, flip_rate=0.0, changed_from_start=0.2)]) == ["frozen"]
    assert names([rec(2, flip_rate=0.99e-4, changed_from_start=0.2)]) == ["frozen"]
    assert names([rec(2, flip_rate=1.01e-4, changed_from_start=0.2)]) == []
    assert names([rec(1, flip_rate=0.0, changed_from_start=0.2)]) == []  # the first epoch is exempt
    assert names([rec(None, flip_rate=0.0, changed_from_start=0.2)]) == []
    assert names([rec(5, flip_rate=None)]) == []


def test_flag_stuck():
    assert names([rec(3, changed_from_start=0.0005)]) == ["stuck"]
    assert names([rec(2, changed_from_start=0.0005)]) == []
    assert names([rec(3, changed_from_start=0.0015)]) == []


def test_flag_oscillating_reads_the_history():
    before = rec(1, flip_rate=0.2, changed_from_start=0.2)
    assert names([before, rec(2, flip_rate=0.04, changed_from_start=0.205)]) == ["oscillating"]
    assert names([before, rec(2, flip_rate=0.04, changed_from_start=0.195)]) == ["oscillating"]
    assert names([before, rec(2, flip_rate=0.04, changed_from_start=0.22)]) == []  # they add up: learning
    assert names([before, rec(2, flip_rate=0.015, changed_from_start=0.2)]) == []  # few flips
    assert names([rec(2, flip_rate=0.04, changed_from_start=0.2)]) == []  # no history
    assert names([rec(0, changed_from_start=0.0), rec(1, flip_rate=0.3, changed_from_start=0.3)]) == []


def test_flag_saturated():
    assert names([rec(saturation=0.51)]) == ["saturated"]
    assert names([rec(saturation=0.5)]) == []
    assert names([rec(saturation=None)]) == []


def test_every_flag_is_tested_and_explained():
    assert [f.name for f in FLAGS] == ["over-clipped", "frozen", "stuck", "oscillating", "saturated"]
    for f in FLAGS:
        assert "\n" not in f.meaning and 40 < len(f.meaning) < 200 and ";" in f.meaning  # what, then what to try
    assert f"{100 * flag_rules.OSCILLATING_FLIP_RATE:g}%" in FLAGS[3].meaning


# ---------------------------------------------------------------------------------------------------------
# diagnostics.jsonl
# ---------------------------------------------------------------------------------------------------------


def write_run(tmp_path: Path, spec: str, epochs: int = 3) -> tuple[Path, nn.Module]:
    """A run directory: diagnostics of a few perturbed 'epochs' and the last model file (conftest's TinyNet)."""
    torch.manual_seed(0)
    model = binarize.convert(binarize.create_model(spec), example_inputs=torch.zeros(1, 3, 16, 16))
    tracker = SignTracker(model)
    batches = [torch.randn(2, 3, 16, 16)]
    append_records(tmp_path / DIAGNOSTICS, diagnose(model, batches).to_records(0))
    for epoch in range(1, epochs + 1):
        perturb(model, 0.3 / epoch, seed=epoch)
        append_records(tmp_path / DIAGNOSTICS, diagnose(model, batches, tracker=tracker).to_records(epoch))
    binarize.save(model, tmp_path / "last.safetensors", run=RunRecord(metrics={"epoch": epochs}))
    return tmp_path, model


def test_history_round_trip(tmp_path, net_spec):
    run, _ = write_run(tmp_path, net_spec)
    history = read_history(run)
    assert list(history.layers) == ["conv1", "conv2"]
    assert history.epochs == [0, 1, 2, 3]
    assert [r["epoch"] for r in history.layers["conv1"]] == [0, 1, 2, 3]
    assert history.latest() == [history.layers["conv1"][-1], history.layers["conv2"][-1]]
    lines = (run / DIAGNOSTICS).read_text().splitlines()
    assert len(lines) == 8 and all(list(json.loads(line)) == list(RECORD_KEYS) for line in lines)
    assert read_history(run / DIAGNOSTICS) == history


def test_reader_tolerates_a_truncated_last_line(tmp_path, net_spec):
    run, _ = write_run(tmp_path, net_spec, epochs=1)
    path = run / DIAGNOSTICS
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # cut inside the last record
    history = read_history(path)
    assert [r["epoch"] for r in history.layers["conv1"]] == [0, 1]
    assert [r["epoch"] for r in history.layers["conv2"]] == [0]


def test_reader_rejects_a_corrupt_line_and_a_missing_file(tmp_path, net_spec):
    run, _ = write_run(tmp_path, net_spec, epochs=1)
    path = run / DIAGNOSTICS
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    with pytest.raises(FileFormatError, match="line 2"):
        read_history(path)
    path.write_text('{"layer": "x"}\n')
    with pytest.raises(FileFormatError, match="line 1: no 'epoch' key"):
        read_history(path)
    with pytest.raises(FileFormatError, match="no such file"):
        read_history(tmp_path / "nowhere.jsonl")


def test_resume_trims_and_rewrites_epochs(tmp_path, net_spec):
    run, model = write_run(tmp_path, net_spec)
    path = run / DIAGNOSTICS
    trim_history(path, keep_until=1)
    assert read_history(path).epochs == [0, 1]
    again = diagnose(model).to_records(1)  # epoch 1 written again after a resume: the later record wins
    append_records(path, again)
    history = read_history(path)
    assert history.epochs == [0, 1]
    assert history.layers["conv1"][-1] == again[0]


def test_summary_is_plain_json_with_the_flags(tmp_path):
    records = [rec(2, layer="a", saturation=0.9), rec(2, layer="b")]
    summary = History.from_records(records).summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["epochs"] == [2]
    assert [(r["layer"], r["flags"]) for r in summary["layers"]] == [("a", ["saturated"]), ("b", [])]
    assert list(summary["flags"]) == ["saturated"]


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def test_weight_histograms(tmp_path):
    from binarize.diagnostics.plots import plot_weight_histograms, weight_histogram_figure

    model = tiny_binary()
    model.conv2.tau.fill_(0.9)
    fig = weight_histogram_figure(model, columns=1)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split()[0] for ax in axes] == ["conv1", "conv2"]
    for ax, entry, (_, layer) in zip(axes, diagnose(model), binary_layers(model), strict=True):
        texts = [t.get_text() for t in ax.texts]
        assert f"clipped {100 * entry.clipped:.1f}%" in texts[0]
        assert f"nominal {100 * entry.clipped_nominal:.1f}%" in texts[0]
        q = -np.abs(ref_w1(layer.weight)).mean() * math.log(2 - 2 * float(layer.tau))
        bounds = sorted(
            line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--" and len(line.get_xdata())
        )
        assert bounds == pytest.approx([-q, q], rel=1e-9)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["W1 (histogram)", "Laplace(0, b), b = mean|W1|", "clamp bounds ±Q(τ)"]
    assert "tau per layer" in fig.get_suptitle()
    path = plot_weight_histograms(model, tmp_path / "sub" / "weights.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_curves(tmp_path, net_spec):
    from binarize.diagnostics.plots import history_figure, plot_history

    run, _ = write_run(tmp_path, net_spec)
    history = read_history(run)
    fig = history_figure(history)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["conv1", "conv2"]
    clipped, nominal, flips = axes[0].lines
    assert list(clipped.get_xdata()) == [0, 1, 2, 3]
    assert list(clipped.get_ydata()) == [r["clipped"] for r in history.layers["conv1"]]
    assert list(nominal.get_ydata()) == [r["clipped_nominal"] for r in history.layers["conv1"]]
    assert list(flips.get_xdata()) == [1, 2, 3]  # epoch 0 has no flip rate
    assert axes[0].get_yscale() == "log" and axes[0].get_xlabel() == "epoch"
    assert plot_history(history, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="no records"):
        history_figure(History({}))


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch):
    from binarize.diagnostics import plots

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib.figure now raises ImportError
    assert not plots.plots_available()
    with pytest.raises(BinarizeError, match=r"^the plots need matplotlib: pip install 'binarize\[plots\]'$"):
        plots.weight_histogram_figure(tiny_binary())


def test_plots_leave_pyplot_and_the_backend_alone():
    """In a fresh interpreter: an Agg figure without pyplot, and matplotlib.use is never called."""
    probe = r"""
import sys, matplotlib
def use(*args, **kwargs):
    raise AssertionError("matplotlib.use was called")
matplotlib.use = use
from binarize.diagnostics import plots, History
fig = plots.history_figure(History.from_records([{"epoch": 0, "layer": "a", "clipped": 0.3, "clipped_nominal": 0.3}]))
print("matplotlib.pyplot" in sys.modules, type(fig.canvas).__name__)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "FigureCanvasAgg"]


def test_diagnostics_import_neither_rich_nor_matplotlib_at_import_time():
    package = Path(binarize.__file__).parent / "diagnostics"
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            assert not any(m.split(".")[0] in ("rich", "matplotlib") for m in modules), (path.name, modules)


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def rendered(diagnostics, width: int = 140) -> str:
    from binarize.diagnostics.table import render_table

    console = Console(record=True, width=width)
    render_table(diagnostics, console, title="run")
    return console.export_text()


def test_table_rows_and_flag_legend():
    records = [
        rec(4, layer="layer1.0.conv1", clipped=0.4, clipped_nominal=0.3, saturation=0.6, flip_rate=0.0123),
        rec(4, layer="layer3.2.conv2"),
    ]
    text = rendered(History.from_records(records))
    assert "run, epoch 4" in text
    row = next(line for line in text.splitlines() if line.startswith("layer1.0.conv1"))
    assert row.split() == [
        "layer1.0.conv1", "40.0", "30.0", "1.23", "10.0", "90.0", "60.0", "0.400", "1.000", "1.30", "over-clipped",
    ]  # fmt: skip
    assert any(line.strip() == "saturated" for line in text.splitlines())  # the second flag of the row
    other = next(line for line in text.splitlines() if line.startswith("layer3.2.conv2"))
    assert other.split()[-1] == "1.30"  # no flag
    by_name = {f.name: f.meaning for f in FLAGS}
    legend = " ".join(text.split())
    for name in ("over-clipped", "saturated"):
        assert f"{name}: {by_name[name]}" in legend
    assert "frozen:" not in legend and "no flags raised" not in legend


def test_table_of_a_diagnosis_without_history():
    model = tiny_binary()
    for _, layer in binary_layers(model):
        layer.tau.fill_(0.95)  # uniform-shaped weights: the clamp clips none of them, nothing is flagged
    text = rendered(diagnose(model), width=80)
    assert "conv1" in text and "conv2" in text and "no flags raised" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    row = next(line for line in text.splitlines() if line.startswith("conv1"))
    assert row.split()[3:7] == ["-", "-", "-", "-"]  # no tracker, no batches


# ---------------------------------------------------------------------------------------------------------
# The command (cli/diagnose.py; the lead registers it in cli/main.py)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_app() -> typer.Typer:
    from binarize.cli.diagnose import diagnose_command

    app = typer.Typer()
    app.command("diagnose")(diagnose_command)
    app.callback()(lambda: None)
    return app


def invoke(app, *args):
    return CliRunner().invoke(app, ["diagnose", *[str(a) for a in args]])


def test_cli_run_directory_table_json_and_plots(cli_app, tmp_path, net_spec):
    run, _ = write_run(tmp_path / "run", net_spec)
    result = invoke(cli_app, run)
    assert result.exit_code == 0, result.output
    assert "run: diagnostics, epoch 3" in result.stdout
    assert "conv1" in result.stdout and "conv2" in result.stdout
    result = invoke(cli_app, run, "--format", "json", "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == read_history(run).summary()
    assert [r["epoch"] for r in summary["layers"]] == [3, 3]
    for name in ("diagnostics.png", "weights.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"wrote {tmp_path / 'plots' / name}" in result.stderr


def test_cli_model_file_with_data(cli_app, tmp_path, make_images, net_spec):
    run, _ = write_run(tmp_path / "run", net_spec, epochs=1)
    data = make_images(tmp_path / "images", train=2, val=3)
    result = invoke(cli_app, run / "last.safetensors", "--format", "json", "--data", data, "--workers", "0")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [r["layer"] for r in layers] == ["conv1", "conv2"]
    assert all(r["epoch"] == 1 and r["flip_rate"] is None and 0 < r["saturation"] < 1 for r in layers)
    expected = diagnose(binarize.load(run / "last.safetensors")).to_records(1)
    for got, want in zip(layers, expected, strict=True):
        assert got["clipped"] == want["clipped"] and got["quant_error"] == want["quant_error"]


@pytest.mark.parametrize(
    ("target", "extra", "fragment"),
    [
        ("nowhere", (), "no such file or directory"),
        ("empty", (), "holds no diagnostics.jsonl"),
        ("run", ("--data", "x"), "--data measures a model file"),
        ("notes.txt", (), "not a safetensors file"),
    ],
)
def test_cli_errors_are_one_line(cli_app, tmp_path, net_spec, target, extra, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    if target == "run":
        write_run(tmp_path / "run", net_spec, epochs=1)
    result = invoke(cli_app, tmp_path / target, *extra)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
