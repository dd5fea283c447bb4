"""Tests of binarize.conversion.report: the layer table and the cost summary, checked against hand counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import binarize
from binarize.conversion.report import LayerEntry, Report


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run as fast on one thread, and two threads stall badly when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class HeadLinear(nn.Linear):
    """A Linear subclass with its own class name (like torch's NonDynamicallyQuantizableLinear)."""


class Small(nn.Module):
    """conv1 (float, first) -> dw (float, depthwise) -> conv2 (binary) -> fc (float, last); one unused conv."""

    def __init__(self, head: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.unused = nn.Conv2d(32, 32, 1)
        self.fc = head(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


# Hand counts for one 3x8x8 image.
CONV1_MACS = 16 * 8 * 8 * (3 * 3 * 3)
DW_MACS = 16 * 8 * 8 * (1 * 3 * 3)
CONV2_MACS = 32 * 8 * 8 * (16 * 3 * 3)
FC_MACS = 10 * 32
CONV2_WEIGHTS = 32 * 16 * 3 * 3
PARAMS = 16 * 27 + 2 * 16 + (16 * 9 + 16) + CONV2_WEIGHTS + 32 + 2 * 32 + (320 + 10)  # + alpha (32)
BUFFERS = 2 * 16 + 2 * 32  # running mean and var; tau and num_batches_tracked not counted


def _convert(
    policy: binarize.Policy | None = None, head: type[nn.Linear] = nn.Linear, layer: binarize.LayerOptions | None = None
) -> nn.Module:
    torch.manual_seed(0)
    return binarize.convert(Small(head), policy, (torch.randn(1, 3, 8, 8),), layer=layer)


def test_layers_of_a_converted_model():
    report = binarize.inspect(_convert())
    assert report.layers == (
        LayerEntry("conv1", "Conv2d", [16, 3, 3, 3], "float", "first conv", CONV1_MACS),
        LayerEntry("dw", "Conv2d", [16, 1, 3, 3], "float", "depthwise", DW_MACS),
        LayerEntry("conv2", "ReCUConv2d", [32, 16, 3, 3], "binary", "binarized", CONV2_MACS),
        LayerEntry("fc", "Linear", [10, 32], "float", "last layer", FC_MACS),
    )  # the unused conv is not part of the traced model


def test_summary_counts_by_hand():
    summary = binarize.inspect(_convert()).to_dict()["summary"]
    flops = CONV1_MACS + DW_MACS + FC_MACS
    fp32_bytes = 4 * (PARAMS + BUFFERS)
    assert {k: summary[k] for k in ("binary_convs", "float_convs", "float_linears", "bops", "flops")} == {
        "binary_convs": 1,
        "float_convs": 2,
        "float_linears": 1,
        "bops": CONV2_MACS,
        "flops": flops,
    }
    assert summary["ops"] == flops + CONV2_MACS / 64
    assert summary["binary_mac_fraction"] == CONV2_MACS / (CONV2_MACS + flops)
    assert summary["params"] == PARAMS
    assert summary["fp32_bytes"] == fp32_bytes
    assert summary["packed_bytes"] == fp32_bytes - 4 * CONV2_WEIGHTS + CONV2_WEIGHTS // 8
    assert summary["input_size"] == [3, 8, 8] and summary["traced"] is True
    assert summary["activations_replaced"] == 1 and summary["shortcuts_added"] == 0
    assert summary["policy"] == binarize.Policy().to_dict()
    assert "trace_error" not in summary


def test_packed_size_rounds_each_binary_layer_up_to_whole_bytes():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)
    )
    binary = binarize.convert(model, binarize.Policy(min_in_channels=0), (torch.randn(1, 3, 8, 8),))
    summary = binarize.inspect(binary).to_dict()["summary"]
    assert summary["binary_convs"] == 1
    bits = 3 * 8 * 3 * 3  # 216 weights: 27 bytes
    assert summary["fp32_bytes"] - summary["packed_bytes"] == 4 * bits - 27
    odd = binarize.convert(nn.Sequential(nn.Conv2d(3, 9, 1), nn.Conv2d(9, 1, 1), nn.Conv2d(1, 2, 1)),
                           binarize.Policy(min_in_channels=0), (torch.randn(1, 3, 4, 4),))  # fmt: skip
    summary = binarize.inspect(odd).to_dict()["summary"]
    assert summary["fp32_bytes"] - summary["packed_bytes"] == 4 * 9 - 2  # 9 weights take 2 bytes


def test_activations_only_layers_are_not_packed():
    summary = binarize.inspect(_convert(layer=binarize.LayerOptions(binarize_weights=False))).to_dict()["summary"]
    assert summary["packed_bytes"] == summary["fp32_bytes"] == 4 * (PARAMS + BUFFERS)
    assert summary["bops"] == CONV2_MACS  # activations are binary: the MACs are still counted as binary


def test_example_inputs_override_the_recorded_size():
    report = binarize.inspect(_convert(), (torch.randn(1, 3, 16, 16),))
    assert report.summary.input_size == [3, 16, 16]
    assert report.to_dict()["summary"]["bops"] == 4 * CONV2_MACS
    assert binarize.inspect(_convert(), torch.randn(2, 3, 16, 16)) == report  # one tensor; MACs per image


def test_linear_subclasses_are_counted_as_linear_layers():
    summary = binarize.inspect(_convert(head=HeadLinear)).to_dict()["summary"]
    assert (summary["binary_convs"], summary["float_convs"], summary["float_linears"]) == (1, 2, 1)


def test_bireal_and_prelu_parameters_are_counted():
    binary = _convert(binarize.Policy(shortcuts="bireal", activation="prelu"))
    report = binarize.inspect(binary)
    shortcut_conv = 32 * 16  # 16 -> 32 channels: a float 1x1 conv
    assert report.to_dict()["summary"]["params"] == PARAMS + shortcut_conv + 16  # + PReLU slopes
    assert report.to_dict()["summary"]["shortcuts_added"] == 1
    entry = next(e for e in report.layers if e.name.endswith("_shortcut.conv"))
    assert (entry.decision, entry.reason, entry.macs) == ("float", "Bi-Real shortcut of conv2", 32 * 8 * 8 * 16)
    assert report.to_dict()["summary"]["flops"] == CONV1_MACS + DW_MACS + FC_MACS + entry.macs


def test_an_unconverted_model_is_described_by_its_types():
    report = binarize.inspect(Small(), (torch.randn(1, 3, 8, 8),))
    assert [(e.name, e.decision, e.reason, e.macs) for e in report.layers] == [
        ("conv1", "float", "not converted", CONV1_MACS),
        ("dw", "float", "not converted", DW_MACS),
        ("conv2", "float", "not converted", CONV2_MACS),
        ("unused", "float", "not converted", 0),
        ("fc", "float", "not converted", FC_MACS),
    ]
    s = report.to_dict()["summary"]
    assert (s["traced"], s["policy"], s["binary_convs"], s["bops"], s["binary_mac_fraction"]) == (None, None, 0, 0, 0.0)
    assert s["packed_bytes"] == s["fp32_bytes"]


def test_inspect_default_input_size():
    report = binarize.inspect(Small())  # no meta and no timm config: one 3x224x224 image
    assert report.to_dict()["summary"]["input_size"] == [3, 224, 224]
    assert report.layers[0].macs == 16 * 224 * 224 * 27


def test_to_dict_is_plain_json():
    report = binarize.inspect(_convert(binarize.Policy(keep=("dw",))))
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert list(data) == ["layers", "summary"]
    assert data["layers"][1] == {
        "name": "dw", "op": "Conv2d", "shape": [16, 1, 3, 3], "decision": "float", "reason": "user rule keep:dw",
        "macs": DW_MACS,
    }  # fmt: skip
    assert data["summary"]["policy"]["keep"] == ["dw"]
    assert isinstance(report, Report) and data == Report(report.layers, report.summary).to_dict()


def test_inspect_leaves_the_model_and_its_mode_alone():
    binary = _convert().train()
    binary.bn1.eval()  # a frozen BatchNorm inside a training model stays frozen
    modes = [m.training for m in binary.modules()]
    state = {k: v.clone() for k, v in binary.state_dict().items()}
    binarize.inspect(binary)
    assert [m.training for m in binary.modules()] == modes and not binary.bn1.training
    assert all(torch.equal(v, binary.state_dict()[k]) for k, v in state.items())  # no BN statistics updated


class OtherConvs(nn.Module):
    """A 2D conv net with a transposed conv, next to 1D and 3D convs: only the 2D convs can become binary."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.up(torch.relu(self.conv(torch.relu(self.stem(x))))).mean((2, 3)))


def test_convs_binarize_does_not_convert_are_listed_with_a_reason():
    binary = binarize.convert(OtherConvs(), example_inputs=torch.randn(1, 3, 8, 8))
    report = binarize.inspect(binary)
    assert [(e.name, e.op, e.decision, e.reason, e.macs) for e in report.layers] == [
        ("stem", "Conv2d", "float", "first conv", 16 * 8 * 8 * 27),
        ("conv", "ReCUConv2d", "binary", "binarized", 16 * 8 * 8 * 16 * 9),
        ("up", "ConvTranspose2d", "float", "unsupported: ConvTranspose2d (transposed convolutions are not binarized)",
         16 * 8 * 8 * 8 * 4),  # each input value meets 8 x 2 x 2 kernel taps
        ("fc", "Linear", "float", "last layer", 80),
    ]  # fmt: skip
    s = report.to_dict()["summary"]
    assert (s["binary_convs"], s["float_convs"], s["float_linears"]) == (1, 2, 1)
    assert s["flops"] == 16 * 8 * 8 * 27 + 16 * 8 * 8 * 8 * 4 + 80

    conv1d = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3))
    report = binarize.inspect(binarize.convert(conv1d, example_inputs=torch.randn(1, 3, 16)))
    assert [(e.name, e.reason, e.macs) for e in report.layers] == [
        ("0", "unsupported: Conv1d (only 2D convolutions are binarized)", 8 * 14 * 9),
        ("2", "unsupported: Conv1d (only 2D convolutions are binarized)", 8 * 12 * 24),
    ]
    assert report.summary.float_convs == 2 and report.summary.input_size == [3, 16]
    assert report.summary.warnings == (
        "no convolution was binarized: every conv stays float (the report gives each one's reason)",
    )
    conv3d = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Conv3d(4, 8, 1))
    report = binarize.inspect(binarize.convert(conv3d, example_inputs=torch.randn(1, 1, 6, 6, 6)))
    assert [(e.name, e.op, e.reason, e.macs) for e in report.layers] == [
        ("0", "Conv3d", "unsupported: Conv3d (only 2D convolutions are binarized)", 4 * 64 * 27),
        ("2", "Conv3d", "unsupported: Conv3d (only 2D convolutions are binarized)", 8 * 64 * 4),
    ]


class Guessed(nn.Module):
    """Untraceable; a 1x1 conv named ``downsample`` and convs inside ``se``: roles only names show here."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.conv, self.downsample = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(16, 32, 1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        shortcut = self.downsample(x) if x.mean() > 0 else 0  # data-dependent control flow: converted by name
        x = self.act(self.conv(x) + shortcut)
        y = x * torch.sigmoid(self.se(x))
        return self.fc(y.mean((2, 3)))


def test_decisions_guessed_from_names_say_so():
    x = torch.randn(1, 3, 8, 8)
    binary = binarize.convert(Guessed(), example_inputs=x)
    record = binarize.binarize_meta(binary)
    assert record.traced is False
    assert {n: (r.reason, r.guessed) for n, r in record.layers.items()} == {
        "stem": ("first conv", False),
        "conv": ("binarized", False),
        "downsample": ("1x1 shortcut", True),
        "se.1": ("squeeze-excitation", True),
        "se.3": ("squeeze-excitation", True),
        "fc": ("last layer", False),
    }
    reasons = {e.name: e.reason for e in binarize.inspect(binary).layers}
    assert reasons["downsample"] == "1x1 shortcut (guessed from the name)"
    assert reasons["se.1"] == reasons["se.3"] == "squeeze-excitation (guessed from the name)"
    assert type(record).from_dict(json.loads(json.dumps(record.to_dict()))) == record  # as a model file stores it
    # a decision that does not rest on the guess is not marked: a user rule, or the guessed role switched off
    record = binarize.binarize_meta(
        binarize.convert(Guessed(), binarize.Policy(keep=("downsample",), keep_se=False), x)
    )
    assert {n: (r.reason, r.guessed) for n, r in record.layers.items() if n in ("downsample", "se.1")} == {
        "downsample": ("user rule keep:downsample", False),
        "se.1": ("binarized", False),
    }


def test_inputs_that_do_not_fit_are_one_line_errors(capfd):
    binary = _convert()
    with pytest.raises(binarize.BinarizeError) as info:
        binarize.inspect(binary, torch.randn(1, 4, 8, 8))
    assert str(info.value) == (
        "conv1 expects 3 input channels, the example input has 4; pass example inputs of the model's input size"
    )
    assert capfd.readouterr() == ("", "")
