"""Tests of binarize.files: the safetensors model file, its round trips and its errors."""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import binarize
from binarize.errors import BinarizeError, FileFormatError, WeightsError
from binarize.files import FORMAT_VERSION, atomic_write, read_metadata
from binarize.nn import ReCUConv2d

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run as fast on one thread, and two threads stall badly when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Moves every float parameter and buffer away from its initial value, so a round trip that drops
    or mixes up any tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("tau"):
                t.fill_(0.93)
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def _round_trip(binary: nn.Module, path: Path, x: torch.Tensor, model: nn.Module | None = None) -> nn.Module:
    _perturb(binary)
    binary.eval()
    binarize.save(binary, path)
    loaded = binarize.load(path, model=model)
    assert not loaded.training
    original, restored = binary.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(loaded(x), binary(x))
    assert binarize.inspect(loaded).to_dict() == binarize.inspect(binary).to_dict()
    return loaded


def test_round_trip_timm_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    binary = binarize.convert(binarize.create_model("regnetx_002", num_classes=10), example_inputs=(x[:1],))
    _round_trip(binary, tmp_path / "regnetx.safetensors", x)
    assert read_metadata(tmp_path / "regnetx.safetensors")["source"] == {"spec": "regnetx_002", "num_classes": 10}


def test_round_trip_torchvision_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    float_model = binarize.create_model("torchvision:mobilenet_v3_small", num_classes=10)
    binary = binarize.convert(float_model, binarize.Policy(activation="prelu"), (x[:1],))
    _round_trip(binary, tmp_path / "mnv3.safetensors", x)


@pytest.mark.skipif(not RESNET20.is_file(), reason=f"shared checkpoint not found: {RESNET20}")
def test_round_trip_zoo_model_with_the_real_checkpoint(tmp_path):
    float_model = binarize.create_model("cifar_resnet20", weights=RESNET20)
    file_weights = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(float_model.conv1.weight, file_weights["module.conv1.weight"])
    x = torch.randn(4, 3, 32, 32)
    policy = binarize.Policy(shortcuts="bireal", shortcut_downsample="zero_pad")
    binary = binarize.convert(float_model, policy, (x[:1],), layer=binarize.LayerOptions(activation_bias=True))
    binarize.recalibrate_bn(binary, [torch.randn(16, 3, 32, 32) for _ in range(2)])
    loaded = _round_trip(binary, tmp_path / "resnet20.safetensors", x)
    assert len(binarize.binarize_meta(loaded).shortcuts) == 18
    biases = [k for k in loaded.state_dict() if k.endswith(".activation_bias")]
    assert len(biases) == 18 and all(loaded.state_dict()[k].any() for k in biases)


def test_round_trip_bireal_avgpool_conv(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), binarize.Policy(shortcuts="bireal"), (x[:1],))
    assert any(k.endswith("_shortcut.conv.weight") for k in binary.state_dict())
    _round_trip(binary, tmp_path / "bireal.safetensors", x)


def test_round_trip_bireal_shared_downsample(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    policy = binarize.Policy(shortcuts="bireal", shortcut_downsample="shared")
    binary = binarize.convert(binarize.create_model("torchvision:resnet18", num_classes=10), policy, (x[:1],))
    loaded = _round_trip(binary, tmp_path / "shared.safetensors", x)
    assert binarize.binarize_meta(loaded).shortcuts["layer2.0.conv1"] == "layer2.0.downsample.1"


def test_round_trip_user_built_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    binary = binarize.convert(torchvision.models.squeezenet1_1(num_classes=5), example_inputs=(x[:1],))
    path = tmp_path / "user.safetensors"
    _round_trip(binary, path, x, model=torchvision.models.squeezenet1_1(num_classes=5))
    assert read_metadata(path)["source"] is None
    with pytest.raises(FileFormatError, match="pass it: binarize.load\\(path, model=float_model\\)"):
        binarize.load(path)
    shapes = "classifier.1.weight: file \\[5, 512, 1, 1\\] vs model \\[7, 512, 1, 1\\]"
    with pytest.raises(WeightsError, match="wrong shape .*" + shapes):
        binarize.load(path, model=torchvision.models.squeezenet1_1(num_classes=7))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn, self.act, self.fc = nn.BatchNorm2d(16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        if x.mean() > 0:  # torch.fx cannot trace this: the model is converted by module name
            x = self.bn(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_round_trip_untraceable_model(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    binary = binarize.convert(Untraceable(), binarize.Policy(activation="prelu"), (x[:1],))
    assert binarize.binarize_meta(binary).traced is False and isinstance(binary.act, nn.PReLU)
    _round_trip(binary, tmp_path / "untraced.safetensors", x, model=Untraceable())


def test_round_trip_model_from_a_user_file(tmp_path, monkeypatch):
    source = tmp_path / "nets.py"
    source.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make_net(num_classes=10):
                return nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                    nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
                )
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    binary = binarize.convert(binarize.create_model("nets.py:make_net", num_classes=3), example_inputs=(x[:1],))
    _round_trip(binary, tmp_path / "net.safetensors", x)
    assert read_metadata(tmp_path / "net.safetensors")["source"] == {"spec": f"{source}:make_net", "num_classes": 3}


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    path = binarize.save(binary, tmp_path / "m.safetensors", extra={"top1": 0.5, "note": "ok"})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # the whole header is JSON: no pickle anywhere
    assert set(header["__metadata__"]) == {"binarize"}
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(binary.state_dict())
        document = json.loads(f.metadata()["binarize"])
    assert document == {
        "format": "binarize",
        "format_version": FORMAT_VERSION,
        "library_version": binarize.__version__,
        "source": {"spec": "cifar_resnet20", "num_classes": None},
        "conversion": binarize.binarize_meta(binary).to_dict(),
        "run": {"metrics": {}, "data": None, "classes": None, "extra": {"top1": 0.5, "note": "ok"}},
    }
    assert document["conversion"]["policy"] == binarize.Policy().to_dict()
    assert document["conversion"]["input_size"] == [3, 32, 32]
    assert binarize.run_record(binarize.load(path)).extra == {"top1": 0.5, "note": "ok"}


def test_refuses_to_overwrite_without_force(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(BinarizeError, match="already exists"):
        binarize.save(binary, path)
    assert path.read_bytes() == b"precious"
    binarize.save(binary, path, force=True)
    assert read_metadata(path)["format"] == "binarize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


def test_atomic_write_leaves_nothing_behind_when_writing_fails(tmp_path):
    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "out.safetensors", broken)
    assert list(tmp_path.iterdir()) == []


def test_saved_file_permissions_follow_the_umask(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    previous = os.umask(0o022)
    try:
        path = binarize.save(binary, tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(BinarizeError, match="takes a model returned by binarize.convert"):
        binarize.save(nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _write(path: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    save_file(tensors or {"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a safetensors file"),
        (b"hello, I am text\n", "is not a safetensors file"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":', "is not a safetensors file"),
        (bytes(random.Random(0).randrange(256) for _ in range(256)), "is not a safetensors file"),
    ],
    ids=["empty", "text", "truncated", "random"],
)
def test_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=message):
        binarize.load(path)


def test_truncated_binarize_file(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    path = binarize.save(binary, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(BinarizeError) as info:
        binarize.load(path)
    assert "\n" not in str(info.value)


def test_safetensors_file_that_is_not_a_binarize_model(tmp_path):
    path = _write(tmp_path / "plain.safetensors")
    with pytest.raises(FileFormatError, match="is a safetensors file but not a binarize model"):
        binarize.load(path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "corrupt binarize metadata"),
        (json.dumps({"format": "binarize"}), "corrupt binarize metadata \\(no format version\\)"),
        (json.dumps({"format": "other", "format_version": 1}), "corrupt binarize metadata"),
        (json.dumps({"format": "binarize", "format_version": FORMAT_VERSION + 1}), "upgrade binarize"),
    ],
)
def test_bad_metadata(tmp_path, document, message):
    path = _write(tmp_path / "m.safetensors", metadata={"binarize": document})
    with pytest.raises(FileFormatError, match=message):
        read_metadata(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        binarize.load(tmp_path / "nope.safetensors")


def test_weights_that_do_not_fit_the_recorded_policy(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    path = binarize.save(binary, tmp_path / "m.safetensors")
    document = read_metadata(path)
    document["conversion"]["policy"]["shortcuts"] = "bireal"  # the tensors no longer match what the policy rebuilds
    _write(tmp_path / "tampered.safetensors", load_file(str(path)), {"binarize": json.dumps(document)})
    expected = "weights do not fit the model: 2 missing (layer2.0.conv1_shortcut.conv.weight, layer3.0.conv1_shortcut"
    with pytest.raises(WeightsError, match=expected.replace(".", "\\.").replace("(", "\\(")):
        binarize.load(tmp_path / "tampered.safetensors")


# ---------------------------------------------------------------------------------------------------
# Files written before the typed record (format version 1)

DATA = Path(__file__).parent / "data"


class V1Net(nn.Module):
    """The tiny model tests/data/v1-*.safetensors were converted from (by binarize before format version 2)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = self.act1(self.bn1(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize(
    ("name", "binarize_weights", "activation_bias"),
    [("activations_only", False, True), ("binary", True, False)],
)
def test_files_of_format_version_1_still_load(name, binarize_weights, activation_bias):
    path = DATA / f"v1-{name.replace('_', '-')}.safetensors"
    assert read_metadata(path)["format_version"] == 1
    header = binarize.files.read_header(path)
    assert header.layer == binarize.LayerOptions(binarize_weights=binarize_weights, activation_bias=activation_bias)
    model = binarize.load(path, model=V1Net())
    convs = [m for m in model.modules() if isinstance(m, ReCUConv2d)]
    assert len(convs) == 1 and convs[0].binarize_weights is binarize_weights
    assert (convs[0].activation_bias is not None) is activation_bias
    expected = load_file(str(DATA / "v1-expected.safetensors"))
    assert torch.equal(model(expected["input"]), expected[name])  # the same outputs as before the change
    run = binarize.run_record(model)
    if name == "activations_only":  # the engine's extra: metrics, data settings and classes became fields
        assert run.metrics == {"epoch": 1, "val_top1": 50.0} and run.classes == ("a", "b", "c")
        assert run.data.input_size == (3, 8, 8) and run.extra == {}
    else:  # a user's extra stays extra
        assert run.extra == {"top1": 0.5, "note": "ok"} and run.data is None
    resaved = binarize.save(model, Path(tempfile.mkdtemp()) / "v2.safetensors")
    assert read_metadata(resaved)["format_version"] == FORMAT_VERSION
    assert torch.equal(binarize.load(resaved, model=V1Net())(expected["input"]), expected[name])


def test_output_path_problems_are_one_line_errors(tmp_path):
    binary = binarize.convert(V1Net(), example_inputs=(torch.zeros(1, 3, 8, 8),))
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    cases = {
        tmp_path / "file" / "m.safetensors": "is a file, not a directory",
        tmp_path / "file" / "sub" / "m.safetensors": "is a file, not a directory",
        tmp_path / "dir": "is a directory",
        Path("/proc/m.safetensors"): "cannot write",
    }
    for path, message in cases.items():
        with pytest.raises(BinarizeError, match=message) as info:
            binarize.save(binary, path, force=True)
        assert "\n" not in str(info.value)


def test_a_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(FileFormatError, match="is a directory, not a model file"):
        binarize.load(tmp_path)


def test_a_deep_copy_keeps_the_record_and_saves(tmp_path):
    binary = binarize.convert(binarize.create_model("cifar_resnet20"), example_inputs=(torch.zeros(1, 3, 32, 32),))
    copied = copy.deepcopy(binary)  # a GraphModule's deepcopy rebuilds the module
    assert binarize.binarize_meta(copied) == binarize.binarize_meta(binary)
    assert copied.binarize_source == binary.binarize_source and copied.pretrained_cfg == binary.pretrained_cfg
    binarize.save(copied, tmp_path / "copy.safetensors")
    assert read_metadata(tmp_path / "copy.safetensors")["source"]["spec"] == "cifar_resnet20"


class RouterBlock(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it is passed as a leaf module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else x


class RoutedNet(nn.Module):
    def __init__(self, block: type[nn.Module] = RouterBlock) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.block = block()
        self.conv, self.bn, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(self.block(self.act(self.stem(x))))).mean((2, 3)))


def test_a_model_converted_with_leaf_modules_loads_with_them(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    binary = binarize.convert(RoutedNet(), example_inputs=(x[:1],), leaf_modules=[RouterBlock])
    record = binarize.binarize_meta(binary)
    assert record.traced and record.leaf_modules == (f"{__name__}.RouterBlock",)
    assert type(binary.block.conv) is nn.Conv2d and isinstance(binary.conv, ReCUConv2d)
    path = tmp_path / "leaf.safetensors"
    loaded = _round_trip(binary, path, x, model=RoutedNet())
    assert binarize.binarize_meta(loaded).leaf_modules == record.leaf_modules and binarize.binarize_meta(loaded).traced
    assert read_metadata(path)["conversion"]["leaf_modules"] == [f"{__name__}.RouterBlock"]


def test_a_leaf_module_that_cannot_be_imported_is_a_one_line_error(tmp_path):
    class LocalBlock(RouterBlock):
        pass

    binary = binarize.convert(RoutedNet(LocalBlock), example_inputs=torch.randn(1, 3, 8, 8), leaf_modules=[LocalBlock])
    path = binarize.save(binary, tmp_path / "local.safetensors")
    name = f"{__name__}.test_a_leaf_module_that_cannot_be_imported_is_a_one_line_error.<locals>.LocalBlock"
    with pytest.raises(FileFormatError) as info:
        binarize.load(path, model=RoutedNet(LocalBlock))
    assert str(info.value) == (
        f"{path} needs the leaf module {name}: cannot import {name} (it was defined inside a function); "
        "define the class at the top level of an importable module"
    )
