"""Tests of binarize.weights: reading messy real-world checkpoints and fitting them to a model."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.serialization
from torch import nn

import binarize.weights
from binarize.errors import WeightsError
from binarize.weights import load_weights, read_state_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"


class Tiny(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)


class Custom:
    """A class a weights_only load must refuse to construct."""


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Tiny()
    model.bn1.running_mean.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ordered: bool = True) -> None:
    assert list(actual) == list(expected) if ordered else sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _error(path_or_call) -> str:
    with pytest.raises(WeightsError) as info:
        path_or_call() if callable(path_or_call) else read_state_dict(path_or_call)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt"])
def test_round_trip(tmp_path, suffix):
    sd = _state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)
    ordered = suffix != ".safetensors"  # safetensors stores tensors in its own order
    _assert_same(read_state_dict(path), sd, ordered)
    _assert_same(read_state_dict(str(path)), sd, ordered)


def test_safetensors_found_by_content_under_other_suffix(tmp_path):
    sd = _state_dict()
    path = tmp_path / "weights.model"
    safetensors.torch.save_file(sd, path)
    _assert_same(read_state_dict(path), sd, ordered=False)


def test_legacy_torch_format(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(tmp_path / "old.pth"), sd)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "best_prec1": 91.7, "epoch": 200},
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "loss": torch.tensor(0.5)},
        lambda sd: {"net": sd},
        lambda sd: {"module": sd},
        lambda sd: {"model": {"state_dict": sd}, "args": {"lr": 0.1}},
        lambda sd: {"state_dict": sd, "state_dict_ema": {k: v + 1 for k, v in sd.items()}},
        lambda sd: {"model_ema": {k: v + 1 for k, v in sd.items()}, "model": sd},
        lambda sd: {"ema": sd, "step": 10},
        lambda sd: {**sd, "epoch": 7, "arch": "tiny"},
    ],
    ids=["state_dict", "model", "model_state_dict", "net", "module", "twice", "ema-last", "ema-order", "ema", "flat"],
)
def test_unwraps_nesting_and_drops_non_tensors(tmp_path, wrap):
    sd = _state_dict()
    torch.save(wrap(sd), tmp_path / "ckpt.pth")
    _assert_same(read_state_dict(tmp_path / "ckpt.pth"), sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module.module."])
def test_strips_prefixes(tmp_path, prefix):
    sd = _state_dict()
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    _assert_same(read_state_dict(tmp_path / "ddp.pt"), sd)


def test_keeps_prefix_not_carried_by_every_key(tmp_path):
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    torch.save(sd, tmp_path / "mixed.pt")
    assert list(read_state_dict(tmp_path / "mixed.pt")) == ["module.a", "b"]


def test_uses_map_location_cpu_and_weights_only(tmp_path, monkeypatch):
    torch.save(_state_dict(), tmp_path / "w.pt")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    read_state_dict(tmp_path / "w.pt")
    assert len(calls) == 1
    assert calls[0]["map_location"] == "cpu"
    assert calls[0]["weights_only"] is True


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_file_whose_storages_claim_cuda(tmp_path, monkeypatch, zip_format):
    # Save with an extra storage tagger that labels every storage 'cuda:0', as a GPU run would.
    monkeypatch.setattr(torch.serialization, "_package_registry", list(torch.serialization._package_registry))
    torch.serialization.register_package(-1, lambda storage: "cuda:0", lambda storage, location: None)
    sd = _state_dict()
    path = tmp_path / "gpu.pth"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=zip_format)
    monkeypatch.undo()
    if zip_format:
        with zipfile.ZipFile(path) as archive:
            assert b"cuda:0" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a loader without map_location runs into
    loaded = read_state_dict(path)
    _assert_same(loaded, sd)
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_real_shared_checkpoint_saved_on_cuda():
    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} is absent (the shared data of the project is not mounted)")
    sd = read_state_dict(RESNET20)
    assert len(sd) == 97
    assert next(iter(sd)) == "conv1.weight"
    assert not any(k.startswith("module.") or k.endswith("num_batches_tracked") for k in sd)
    assert sd["conv1.weight"].shape == (16, 3, 3, 3) and sd["conv1.weight"].device.type == "cpu"
    assert sd["linear.weight"].shape == (10, 64)


def test_missing_file_and_directory(tmp_path):
    assert _error(tmp_path / "nope.pth") == f"weights file not found: {tmp_path / 'nope.pth'}"
    assert "is a directory" in _error(tmp_path)


def test_truncated_zip_checkpoint(tmp_path):
    torch.save(_state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    message = _error(tmp_path / "cut.pt")
    assert message.startswith(f"{tmp_path / 'cut.pt'} is not a weights file (")
    assert "zip archive" in message


def test_corrupt_safetensors(tmp_path):
    safetensors.torch.save_file(_state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    assert "is not a weights file (unreadable safetensors file: " in _error(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert "is not a weights file (unreadable safetensors file: " in _error(tmp_path / "junk.safetensors")


def test_random_bytes(tmp_path):
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    assert "is not a weights file (unrecognised format" in _error(tmp_path / "noise.bin")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"conv1.weight: [1, 2, 3]\n", "it is a text file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML page"),
    ],
    ids=["empty", "text", "lfs", "html"],
)
def test_not_weights_reasons(tmp_path, content, reason):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    message = _error(path)
    assert message.startswith(f"{path} is not a weights file (")
    assert reason in message


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": _state_dict(), "extra": Custom()}, tmp_path / "code.pt")
    message = _error(tmp_path / "code.pt")
    assert "is not a weights file (it contains pickled code that binarize will not execute" in message
    assert "Custom" in message


def test_pickled_module_is_refused(tmp_path):
    torch.save(Tiny(), tmp_path / "model.pt")
    assert "Tiny" in _error(tmp_path / "model.pt")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, "holds no tensors (an empty dict)"),
        ({"epoch": 3, "best_acc": 0.9}, "holds no tensors (top-level keys: epoch, best_acc)"),
        ({"state_dict": {}}, "holds no tensors (top-level keys: state_dict)"),
        (torch.ones(3), "holds a Tensor, not a dict of tensors"),
    ],
    ids=["empty", "no-tensors", "empty-state-dict", "bare-tensor"],
)
def test_no_tensors(tmp_path, obj, expected):
    torch.save(obj, tmp_path / "w.pt")
    assert _error(tmp_path / "w.pt") == f"weights file {tmp_path / 'w.pt'} {expected}"


def test_load_weights_from_file_adds_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in _state_dict(seed=1).items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "old.th")
    model = Tiny()
    model.bn1.num_batches_tracked.fill_(5)
    load_weights(model, tmp_path / "old.th")
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.bn1.num_batches_tracked.item() == 0


def test_load_weights_accepts_raw_dict_and_drops_unused_counter():
    sd = _state_dict(seed=2)
    model = Tiny()
    model.bn1 = nn.BatchNorm2d(4, track_running_stats=False)  # no running stats, no counter
    sd = {k: v for k, v in sd.items() if not k.startswith("bn1.running")}
    load_weights(model, {"model": sd, "epoch": 1})
    assert torch.equal(model.fc.weight, sd["fc.weight"])


def test_mismatch_message_lists_every_category():
    sd = _state_dict()
    del sd["fc.weight"], sd["fc.bias"]
    sd["head.weight"] = torch.zeros(5, 4)
    sd["conv1.weight"] = torch.zeros(4, 1, 3, 3)
    model = Tiny(in_chans=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = _error(lambda: load_weights(model, sd))
    assert message == (
        "weights do not fit the model: 2 missing (fc.weight, fc.bias), 1 unexpected (head.weight), "
        "1 wrong shape (conv1.weight: file [4, 1, 3, 3] vs model [4, 2, 3, 3])"
    )
    _assert_same(model.state_dict(), before)  # nothing was loaded


def test_mismatch_message_caps_names():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])  # 8 tensors
    message = _error(lambda: load_weights(model, {"other.weight": torch.zeros(1)}))
    assert message.startswith("weights do not fit the model: 8 missing (0.weight, 0.bias, 1.weight, 1.bias, 2.weight")
    assert "and 3 more), 1 unexpected (other.weight)" in message


def test_non_strict_ignores_names_but_not_shapes():
    sd = _state_dict(seed=3)
    partial = {"fc.weight": sd["fc.weight"], "extra.weight": torch.zeros(1)}
    model = Tiny()
    load_weights(model, partial, strict=False)
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    message = _error(lambda: load_weights(Tiny(), {"fc.weight": torch.zeros(3, 4)}, strict=False))
    assert message == "weights do not fit the model: 1 wrong shape (fc.weight: file [3, 4] vs model [5, 4])"


def test_load_weights_reports_unreadable_file(tmp_path):
    (tmp_path / "w.pt").write_text("hello")
    assert "is not a weights file (it is a text file)" in _error(lambda: load_weights(Tiny(), tmp_path / "w.pt"))


def test_wrapper_key_order_is_documented():
    keys = binarize.weights.WRAPPER_KEYS
    assert keys.index("state_dict") < keys.index("model") < keys.index("model_ema")
    assert max(keys.index(k) for k in ("state_dict", "model_state_dict", "model", "module", "net")) < min(
        keys.index(k) for k in ("model_ema", "state_dict_ema", "ema")
    )


# --------------------------------------------------------------------------- what load_weights did, a new head


def test_load_weights_returns_what_it_loaded(tmp_path):
    sd = {k: v for k, v in _state_dict(seed=4).items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pt")
    summary = load_weights(Tiny(), tmp_path / "w.pt")
    assert summary == binarize.weights.LoadSummary(source=str(tmp_path / "w.pt"), loaded=len(sd))
    assert summary.line() == f"loaded {len(sd)} tensors from {tmp_path / 'w.pt'}"
    partial = load_weights(Tiny(), {"fc.weight": sd["fc.weight"], "extra.weight": torch.zeros(1)}, strict=False)
    assert (partial.source, partial.loaded, partial.dropped) == (None, 1, ("extra.weight",))
    assert set(partial.kept) == set(sd) - {"fc.weight"}
    assert partial.line().startswith("loaded 1 tensors (dropped: extra.weight; not in the file, left as they were: ")


def test_reset_head_loads_everything_but_the_head():
    """Weights of a 5-class model into a 3-class one: every tensor but the head's is the file's, the head keeps
    the model's own initialisation, and the summary names the head's tensors."""
    sd = _state_dict(seed=5)
    torch.manual_seed(1)
    model = Tiny(num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_weights(model, sd, reset_head=True)
    assert summary.head_reset == ("fc.weight", "fc.bias")
    assert summary.loaded == len(sd) - 2
    assert summary.line() == f"loaded {len(sd) - 2} tensors (head re-initialised: fc.weight, fc.bias)"
    state = model.state_dict()
    for key, value in sd.items():
        expected = fresh[key] if key.startswith("fc.") else value
        assert torch.equal(state[key], expected), key


def test_reset_head_never_skips_another_layer():
    sd = _state_dict(seed=6)
    sd["conv1.weight"] = torch.zeros(4, 2, 3, 3)
    model = Tiny(num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = _error(lambda: load_weights(model, sd, reset_head=True))
    assert message.startswith("weights do not fit the model: 3 wrong shape (")
    assert "conv1.weight: file [4, 2, 3, 3] vs model [4, 3, 3, 3]" in message and "fc.weight" in message
    _assert_same(model.state_dict(), before)


def test_a_head_that_does_not_fit_is_an_error_unless_asked():
    message = _error(lambda: load_weights(Tiny(num_classes=3), _state_dict()))
    assert message.startswith("weights do not fit the model: 2 wrong shape (fc.weight: file [5, 4] vs model [3, 4]")
    assert message.endswith(
        "only the classifier head differs (the file's has 5 outputs): build the model for 5 classes, "
        "or for the new number of classes to re-initialise the head"
    )


def test_the_head_is_the_classifier_timm_names():
    """A model's ``pretrained_cfg["classifier"]`` names its head, even when a later module is a Linear too."""

    class Named(Tiny):
        def __init__(self, num_classes: int) -> None:
            super().__init__(num_classes=num_classes)
            self.aux = nn.Linear(4, 4)
            self.pretrained_cfg = {"classifier": "fc"}

    assert binarize.weights.head_names(Named(3)) == ("fc",)
    assert binarize.weights.head_names(Tiny()) == ("fc",)  # no cfg: the last Linear
    sd = {**_state_dict(seed=7), "aux.weight": torch.zeros(4, 4), "aux.bias": torch.zeros(4)}
    assert load_weights(Named(3), sd, reset_head=True).head_reset == ("fc.weight", "fc.bias")
    sd["aux.weight"] = torch.zeros(2, 4)
    assert "aux.weight: file [2, 4] vs model [4, 4]" in _error(lambda: load_weights(Named(3), sd, reset_head=True))


def test_a_model_built_without_its_head_drops_the_files_head():
    model = Tiny()
    model.fc = nn.Identity()
    model.pretrained_cfg = {"classifier": "fc"}
    sd = _state_dict(seed=8)
    summary = load_weights(model, sd, reset_head=True)
    assert summary.dropped == ("fc.weight", "fc.bias") and summary.loaded == len(sd) - 2
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    assert "2 unexpected (fc.weight, fc.bias)" in _error(lambda: load_weights(model, sd))


def test_plain_pickle_is_refused_in_one_line_without_warnings(tmp_path, capfd):
    """A state dict written with pickle.dump (protocol 4+) makes torch warn before it fails: binarize says one
    thing, and nothing else is printed."""
    import pickle
    import warnings

    with (tmp_path / "raw.pth").open("wb") as f:
        pickle.dump(_state_dict(), f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = _error(tmp_path / "raw.pth")
    assert caught == []
    assert capfd.readouterr().err == ""
    assert "is not a weights file (it is a plain pickle written by pickle.dump" in message
    torch.save(_state_dict(), tmp_path / "p4.pt", pickle_protocol=4, _use_new_zipfile_serialization=False)
    assert "it uses pickle protocol 4, which torch's safe loader" in _error(tmp_path / "p4.pt")
