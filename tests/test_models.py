"""Tests of binarize.models: model specifications, the number of classes, weights for another label set,
offline builds from the local caches, and no process-wide side effects."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import binarize
from binarize.errors import ConfigError, ModelSpecError
from binarize.models import NumClassesNotAccepted, PretrainedUnavailable, loaded_weights, parse_spec, user_module_name

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"
requires_resnet20 = pytest.mark.skipif(not RESNET20.is_file(), reason=f"shared checkpoint not found: {RESNET20}")

NETS = """
from torch import nn

def make_fixed():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
"""


@pytest.fixture
def nets(tmp_path) -> Path:
    path = tmp_path / "my nets.py"
    path.write_text(textwrap.dedent(NETS))
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Fails a test that resolves a host name or asks the Hugging Face Hub for a file."""
    import huggingface_hub
    import timm.models._hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("resnet18", ("timm", "resnet18", None)),
        ("hf-hub:timm/resnet18.a1_in1k", ("timm", "hf-hub:timm/resnet18.a1_in1k", None)),
        ("local-dir:/models/r18", ("timm", "local-dir:/models/r18", None)),
        ("torchvision:resnet18", ("torchvision", "resnet18", None)),
        ("nets.py:make", ("file", "nets.py", "make")),
        ("pkg.mod:make", ("module", "pkg.mod", "make")),
    ],
)
def test_parse_spec(spec, parsed):
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("bad", [-3, -1, True, 2.5, "10"])
def test_num_classes_must_be_a_count(bad):
    with pytest.raises(ConfigError, match="num_classes: ") as info:
        binarize.create_model("cifar_resnet20", num_classes=bad)
    assert "\n" not in str(info.value)


def test_zero_classes_builds_a_headless_model():
    model = binarize.create_model("cifar_resnet20", num_classes=0)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_a_factory_without_num_classes(nets):
    with pytest.raises(NumClassesNotAccepted) as info:
        binarize.create_model(f"{nets}:make_fixed", num_classes=10)
    assert (info.value.factory, info.value.num_classes) == ("make_fixed", 10)
    assert str(info.value) == (
        "make_fixed() takes no num_classes argument, but num_classes=10 was given; "
        "leave num_classes unset or add the parameter to make_fixed()"
    )


def test_user_files_get_the_same_module_name_in_every_process(nets):
    """The module a user's factory file is imported as has a name that does not depend on the process (it
    was built from ``hash(path)``, which differs with every PYTHONHASHSEED)."""
    model = binarize.create_model(f"{nets}:make_fixed")
    name = user_module_name(nets)
    assert name in sys.modules and sys.modules[name].make_fixed.__module__ == name
    assert name.startswith("binarize_user_my_nets_") and name.isidentifier()
    probe = (
        "import sys, binarize; from binarize.models import user_module_name; "
        f"binarize.create_model({str(nets)!r} + ':make_fixed'); "
        f"print(user_module_name({str(nets)!r}), user_module_name({str(nets)!r}) in sys.modules)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [name, "True"]
    assert isinstance(model, nn.Sequential)


@requires_resnet20
def test_weights_for_another_label_set_reset_the_head():
    """10-class CIFAR weights into a 100-class model: everything but the head loads, the head is the fresh
    initialisation, the model is marked, and the summary says so."""
    reference = binarize.create_model("cifar_resnet20", weights=RESNET20)
    assert reference.binarize_source == {"spec": "cifar_resnet20", "num_classes": None}
    assert loaded_weights(reference).line() == f"loaded 97 tensors from {RESNET20}"
    model = binarize.create_model("cifar_resnet20", num_classes=100, weights=RESNET20)
    assert model.binarize_source == {"spec": "cifar_resnet20", "num_classes": 100, "head_reset": True}
    summary = loaded_weights(model)
    assert summary.head_reset == ("linear.weight", "linear.bias")
    assert summary.line() == f"loaded 95 tensors from {RESNET20} (head re-initialised: linear.weight, linear.bias)"
    state, expected = model.state_dict(), reference.state_dict()
    assert state["linear.weight"].shape == (100, 64)
    assert all(torch.equal(state[k], v) for k, v in expected.items() if not k.startswith("linear."))
    with pytest.raises(binarize.BinarizeError, match="only the classifier head differs"):
        binarize.create_model("cifar_resnet20", num_classes=100, weights=RESNET20, reset_head=False)


@requires_resnet20
def test_weights_into_a_headless_model():
    model = binarize.create_model("cifar_resnet20", num_classes=0, weights=RESNET20)
    assert loaded_weights(model).dropped == ("linear.weight", "linear.bias")
    assert "head_reset" not in model.binarize_source


def test_nothing_process_wide_is_changed(monkeypatch):
    """No DNS probe and no Hub offline switch: a failed download is mapped to one line, and the Hub's
    settings are as they were."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError("create_model resolved a host name")

    def unreachable(*args, **kwargs):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is before
        raise ConnectionError("[Errno -2] Name or service not known")

    before = huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(PretrainedUnavailable) as info:
        binarize.create_model("resnet18", pretrained=True)
    assert info.value.reason == (
        "could not download pretrained weights for 'resnet18' (ConnectionError: the network or the Hub is unreachable)"
    )
    assert huggingface_hub.constants.HF_HUB_OFFLINE is before


def test_offline_without_a_cache_fails_at_once(no_network, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for spec, reason in [
        ("resnet18", "the pretrained weights of 'resnet18' are not in the local cache (offline)"),
        ("torchvision:resnet18", "the pretrained weights of 'torchvision:resnet18' are not in the local cache"),
        ("hf-hub:timm/resnet18.a1_in1k", "'hf-hub:timm/resnet18.a1_in1k' needs its configuration from the Hugging"),
    ]:
        with pytest.raises(PretrainedUnavailable) as info:
            binarize.create_model(spec, pretrained=True, offline=True)
        assert info.value.reason.startswith(reason)
    with pytest.raises(PretrainedUnavailable, match="cifar_resnet20 has no downloadable weights"):
        binarize.create_model("cifar_resnet20", pretrained=True, offline=True)


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub keeps downloads in: refs/main names a snapshot holding the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123456789abcdef")
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)


def test_offline_builds_from_the_local_hub_cache(no_network, tmp_path, monkeypatch):
    """Cached Hub weights load offline without a single network call, for a timm name and for hf-hub:."""
    import huggingface_hub.constants

    torch.manual_seed(0)
    source = timm.create_model("test_resnet")  # as many classes as the cached cfg says (1000): timm keeps the head
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    config = {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 160, 160]}}
    _fake_hub_cache(
        tmp_path / "hub",
        "timm/test_resnet.r160_in1k",
        {"model.safetensors": weights.read_bytes(), "config.json": json.dumps(config).encode()},
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = source.state_dict()
    for spec in ("test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k"):
        model = binarize.create_model(spec, pretrained=True, offline=True)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items()), spec
        assert model.binarize_source["spec"] == spec


def test_zoo_pretrained_error_names_the_reason():
    with pytest.raises(ModelSpecError) as info:
        binarize.create_model("cifar_resnet20", pretrained=True)
    assert isinstance(info.value, PretrainedUnavailable)
    assert info.value.reason == "cifar_resnet20 has no downloadable weights"
