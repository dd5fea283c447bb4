"""Tests of binarize.zoo: the CIFAR models of the ReCU paper registered in timm, and the real checkpoints."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.fx
from PIL import Image

import binarize.zoo
from binarize.errors import ModelSpecError
from binarize.weights import load_weights, read_state_dict
from binarize.zoo import AvgPoolShortcut, OptionAShortcut

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
CHECKPOINTS = {
    "cifar_resnet20": "cifar10-resnet20-12fca82f.th",
    "cifar_resnet32": "cifar10-resnet32-d509ac18.th",
    "cifar_resnet44": "cifar10-resnet44-014dd654.th",
    "cifar_resnet56": "cifar10-resnet56-4bfd9763.th",
}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HEADS = {name: ("conv1", "linear") for name in binarize.zoo.MODEL_NAMES} | {"cifar_vgg_small": ("conv0", "classifier")}
# Parameter counts: He et al. 2016 Table 6 gives 0.27M / 0.46M / 0.66M / 0.85M for ResNet-20/32/44/56.
PARAMS_M = {
    "cifar_resnet20": 0.27,
    "cifar_resnet32": 0.46,
    "cifar_resnet44": 0.66,
    "cifar_resnet56": 0.85,
    "cifar_resnet18": 11.0,
    "cifar_vgg_small": 4.66,
}


@pytest.fixture(scope="module", params=binarize.zoo.MODEL_NAMES)
def name_and_model(request):
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param, num_classes=10).eval()


def test_all_names_registered():
    assert set(timm.list_models("cifar_*")) >= set(binarize.zoo.MODEL_NAMES)


def test_forward_shape_and_param_count(name_and_model):
    name, model = name_and_model
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PARAMS_M[name], abs=0.01)


def test_fx_trace_matches_eager(name_and_model):
    _, model = name_and_model
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    # one ReLU module per activation site: no call_module target is used twice
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert len(targets) == len(set(targets))


def test_pretrained_cfg(name_and_model):
    name, model = name_and_model
    first_conv, classifier = HEADS[name]
    for cfg in (model.pretrained_cfg, model.default_cfg, timm.models.get_pretrained_cfg(name).to_dict()):
        assert cfg["input_size"] == (3, 32, 32)
        assert cfg["mean"] == (0.485, 0.456, 0.406)
        assert cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["interpolation"] == "bilinear"
        assert cfg["crop_pct"] == 1.0
        assert cfg["num_classes"] == 10
        assert (cfg["first_conv"], cfg["classifier"]) == (first_conv, classifier)
    modules = dict(model.named_modules())
    assert isinstance(modules[first_conv], torch.nn.Conv2d) and modules[first_conv].in_channels == 3
    assert isinstance(modules[classifier], torch.nn.Linear) and modules[classifier].out_features == 10
    assert model.get_classifier() is modules[classifier]
    assert not timm.models.is_model_pretrained(name)


def test_pretrained_true_raises(name_and_model):
    name, _ = name_and_model
    with pytest.raises(ModelSpecError, match="no downloadable weights.*--weights") as info:
        timm.create_model(name, pretrained=True)
    assert "\n" not in str(info.value)


def test_num_classes_and_in_chans():
    model = timm.create_model("cifar_resnet20", num_classes=100, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    assert model.pretrained_cfg["num_classes"] == 100
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)
    assert len(model.pretrained_cfg["mean"]) == 1
    features = timm.create_model("cifar_vgg_small", num_classes=0)(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512 * 4 * 4)


def test_reset_classifier():
    model = timm.create_model("cifar_vgg_small")
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert model.pretrained_cfg["num_classes"] == 7
    assert model.get_classifier() is model.classifier


def test_unknown_option_and_tag_raise():
    with pytest.raises(ModelSpecError, match="does not take option.*drop_rate"):
        timm.create_model("cifar_resnet20", drop_rate=0.1)
    with pytest.raises(ModelSpecError, match="no pretrained tag"):
        timm.create_model("cifar_resnet20.in1k")


def test_pretrained_cfg_overlay():
    model = timm.create_model("cifar_resnet32", pretrained_cfg_overlay={"mean": (0.5, 0.5, 0.5)})
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["first_conv"] == "conv1"


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    y = OptionAShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # planes // 4 = 8 zero channels on each side
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_avgpool_shortcut_pools_and_zero_pads():
    x = torch.arange(64 * 4 * 4, dtype=torch.float32).reshape(1, 64, 4, 4)
    y = AvgPoolShortcut(64, 128, 2)(x)
    assert y.shape == (1, 128, 2, 2)
    assert torch.equal(y[:, 32:96], torch.nn.functional.avg_pool2d(x, 2))
    assert not y[:, :32].any() and not y[:, 96:].any()


def test_resnet_block_layout():
    model = timm.create_model("cifar_resnet20")
    names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert names[:5] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
    assert "layer3.2.conv2.weight" in names and "linear.bias" in names
    assert isinstance(model.layer2[0].shortcut, OptionAShortcut)
    assert isinstance(model.layer2[1].shortcut, torch.nn.Identity)
    assert model.layer3[0].conv1.stride == (2, 2)
    assert isinstance(timm.create_model("cifar_resnet18").layer4[0].shortcut, AvgPoolShortcut)


def _require(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data of the project is not mounted)")


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_real_checkpoint_loads_strictly(name):
    path = MODELS / CHECKPOINTS[name]
    _require(path)
    model = timm.create_model(name)
    load_weights(model, path, strict=True)
    expected = read_state_dict(path)
    assert torch.equal(model.linear.weight, expected["linear.weight"])
    assert torch.equal(model.layer3[-1].bn2.running_var, expected[f"layer3.{len(model.layer3) - 1}.bn2.running_var"])


def _cifar_test_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test images of every class, read straight from the tarball."""
    images: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(CIFAR_CLASSES))}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 4 or parts[1] != "test" or not member.isfile():
                continue
            label = CIFAR_CLASSES.index(parts[2])
            if len(images[label]) < per_class:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
                images[label].append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            if all(len(v) == per_class for v in images.values()):
                break
    assert all(len(v) == per_class for v in images.values()), "the archive lacks test images of some class"
    x = torch.stack([img for label in sorted(images) for img in images[label]]).float() / 255
    y = torch.tensor([label for label in sorted(images) for _ in images[label]])
    return x, y


def test_resnet20_classifies_real_images():
    _require(MODELS / CHECKPOINTS["cifar_resnet20"])
    _require(CIFAR_TAR)
    model = timm.create_model("cifar_resnet20").eval()
    load_weights(model, MODELS / CHECKPOINTS["cifar_resnet20"])
    x, y = _cifar_test_images(per_class=20)
    cfg = model.pretrained_cfg
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6, f"accuracy {accuracy:.2f} on 200 real test images (README: ~81% on this JPEG copy)"
