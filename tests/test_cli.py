"""Tests of the ``binarize`` command line (convert, inspect): output, files, policy options, and errors.

Most tests run the typer app in-process with ``typer.testing.CliRunner``; a few run the installed
console script and ``python -m binarize.cli`` in a subprocess. This file also defines ``make_net``, the
user model that the tests convert through ``tests/test_cli.py:make_net``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import binarize
from binarize.cli.main import app
from binarize.files import read_metadata

THIS_FILE = Path(__file__).resolve()
SMALL = ["cifar_resnet20", "--no-pretrained", "--input-size", "3,32,32"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models run as fast on one thread, and two threads stall badly when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class MessyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def make_net(num_classes: int = 10) -> nn.Module:
    """The factory the CLI tests name as ``tests/test_cli.py:make_net``."""
    return MessyNet(num_classes)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def messy_weights(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """MessyNet weights as real checkpoints come: nested, DataParallel prefixes, no BN step counters."""
    torch.manual_seed(0)
    state = {k: v for k, v in make_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    state["bn1.running_mean"].normal_()
    path = tmp_path / "weights" / "net.pth"
    path.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "best_prec1": 0.5}, path)
    return path, state


def _api_report(
    spec: str,
    policy: binarize.Policy | None = None,
    size=(3, 32, 32),
    layer: binarize.LayerOptions | None = None,
    **kwargs,
) -> dict:
    model = binarize.create_model(spec, **kwargs)
    return binarize.inspect(binarize.convert(model, policy, (torch.zeros(1, *size),), layer=layer)).to_dict()


# ---------------------------------------------------------------------------------------------------
# convert and inspect


def test_dry_run_table(workdir):
    result = run("convert", *SMALL, "--dry-run", env={"COLUMNS": "200"})  # wide enough not to fold names
    assert result.exit_code == 0, result.stderr
    for text in ("cifar_resnet20: layers", "layer1.0.conv1", "ReCUConv2d", "first conv", "last layer", "binary convs"):
        assert text in result.stdout
    assert list(workdir.iterdir()) == []


def test_dry_run_json_equals_the_api_report(workdir):
    result = run("convert", *SMALL, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == _api_report("cifar_resnet20")
    assert list(workdir.iterdir()) == []


def test_output_file_is_read_by_inspect(workdir):
    result = run("convert", *SMALL, "-o", "out/r20.safetensors", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == "wrote out/r20.safetensors"
    written = json.loads(result.stdout)
    inspected = run("inspect", "out/r20.safetensors", "--format", "json")
    assert inspected.exit_code == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    on_disk = report.pop("file")
    assert report == written
    assert on_disk == {"path": "out/r20.safetensors", "bytes": (workdir / "out/r20.safetensors").stat().st_size,
                       "format": "binarize"}  # fmt: skip
    table = run("inspect", "out/r20.safetensors")
    assert table.exit_code == 0 and "r20.safetensors: summary" in table.stdout


def test_default_output_name(workdir):
    assert run("convert", *SMALL).exit_code == 0
    assert [p.name for p in workdir.iterdir()] == ["cifar_resnet20-binary.safetensors"]


def test_existing_output_needs_force(workdir):
    target = workdir / "m.safetensors"
    target.write_bytes(b"keep me")
    result = run("convert", *SMALL, "-o", target)
    assert_one_line_error(result, "already exists", "--force")
    assert target.read_bytes() == b"keep me"
    result = run("convert", *SMALL, "-o", target, "--force")
    assert result.exit_code == 0, result.stderr
    assert read_metadata(target)["source"]["spec"] == "cifar_resnet20"
    assert sorted(p.name for p in workdir.iterdir()) == ["m.safetensors"]


def test_policy_options_are_mapped_to_the_policy(workdir):
    result = run(
        "convert", *SMALL, "-o", "p.safetensors", "--format", "json",
        "--no-keep-first", "--no-keep-last", "--no-keep-depthwise", "--no-keep-grouped", "--no-keep-shortcut-1x1",
        "--no-keep-se", "--min-in-channels", "2", "--keep", "layer3.*", "--keep", "re:.*conv2", "--binarize", "conv1",
        "--activation", "prelu", "--shortcuts", "bireal", "--shortcut-downsample", "zero_pad", "--activations-only",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    policy = binarize.Policy(
        keep_first=False, keep_last=False, keep_depthwise=False, keep_grouped=False, keep_shortcut_1x1=False,
        keep_se=False, min_in_channels=2, keep=("layer3.*", "re:.*conv2"), binarize=("conv1",), activation="prelu",
        shortcuts="bireal", shortcut_downsample="zero_pad",
    )  # fmt: skip
    layer = binarize.LayerOptions(binarize_weights=False)
    report = json.loads(result.stdout)
    assert report["summary"]["policy"] == policy.to_dict()
    assert read_metadata(workdir / "p.safetensors")["conversion"]["policy"] == policy.to_dict()
    assert read_metadata(workdir / "p.safetensors")["conversion"]["layer"] == layer.to_dict()
    assert report == _api_report("cifar_resnet20", policy, layer=layer)
    reasons = {e["name"]: e["reason"] for e in report["layers"]}
    assert reasons["conv1"] == "user rule binarize:conv1 (activations only)"
    assert (
        reasons["layer3.0.conv1"] == "user rule keep:layer3.*"
        and reasons["layer1.0.conv2"] == "user rule keep:re:.*conv2"
    )


def test_default_options_give_the_default_policy(workdir):
    result = run("convert", *SMALL, "--dry-run", "-f", "json")
    assert json.loads(result.stdout)["summary"]["policy"] == binarize.Policy().to_dict()


def test_user_factory_with_messy_weights(workdir, messy_weights):
    weights, state = messy_weights
    result = run(
        "convert", f"{THIS_FILE}:make_net", "--weights", weights, "--input-size", "3,16,16", "-o", "net.safetensors"
    )
    assert result.exit_code == 0, result.stderr
    loaded = binarize.load(workdir / "net.safetensors")
    assert torch.equal(loaded.conv2.weight, state["conv2.weight"])  # the checkpoint's weights, not a fresh init
    assert torch.equal(loaded.bn1.running_mean, state["bn1.running_mean"])
    float_model = make_net()
    float_model.load_state_dict(state, strict=False)
    expected = binarize.convert(float_model.eval(), example_inputs=(torch.zeros(1, 3, 16, 16),)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
    assert read_metadata(workdir / "net.safetensors")["source"] == {
        "spec": f"{THIS_FILE}:make_net",
        "num_classes": None,
    }


def test_user_factory_relative_path_and_num_classes(workdir):
    (workdir / "nets.py").write_text(THIS_FILE.read_text())
    result = run(
        "convert", "nets.py:make_net", "--num-classes", "4", "--input-size", "3,16,16", "--dry-run", "-f", "json"
    )
    assert result.exit_code == 0, result.stderr
    fc = next(e for e in json.loads(result.stdout)["layers"] if e["name"] == "fc")
    assert fc["shape"] == [4, 32]


# ---------------------------------------------------------------------------------------------------
# Errors: one line on stderr starting with "error:", a non-zero exit, no traceback, nothing written


def test_unknown_model_lists_the_closest_names(workdir):
    line = assert_one_line_error(run("convert", "resnet1B", "--no-pretrained", "-o", "x.safetensors"), "unknown model")
    assert "resnet18" in line.split("closest:")[1]
    assert_one_line_error(run("convert", "torchvision:resnet1B", "--no-pretrained"), "closest:", "resnet18")
    assert list(workdir.iterdir()) == []


def test_weights_that_do_not_fit(workdir, messy_weights):
    """Only the head may be re-initialised (test_weights_for_another_label_set): any other layer that does not fit
    is an error, also with --num-classes."""
    weights, state = messy_weights
    bad = workdir / "weights" / "bad.pth"
    torch.save({**state, "conv2.weight": torch.zeros(8, 16, 3, 3)}, bad)
    result = run("convert", f"{THIS_FILE}:make_net", "--num-classes", "5", "--weights", bad, "-o", "x.safetensors")
    assert_one_line_error(result, "weights do not fit the model", "conv2.weight: file [8, 16, 3, 3] vs model [32, 16,")
    assert not (workdir / "x.safetensors").exists()
    result = run("convert", *SMALL, "--weights", weights, "-o", "x.safetensors")
    assert_one_line_error(result, "missing (", "unexpected (", "layer1.0.conv1.weight")
    assert not (workdir / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"not weights at all\n", "is not a weights file (it is a text file)"),
        (b"\x80\x02corrupt", "is not a weights file"),
    ],
    ids=["text", "corrupt"],
)
def test_unreadable_weights_file(workdir, content, fragment):
    (workdir / "w.pth").write_bytes(content)
    assert_one_line_error(run("convert", *SMALL, "--weights", "w.pth", "-o", "x.safetensors"), fragment)
    assert sorted(p.name for p in workdir.iterdir()) == ["w.pth"]


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        (
            "--shortcuts",
            "birael",
            "policy.shortcuts: must be one of 'none', 'bireal', got 'birael'; did you mean 'bireal'?",
        ),
        ("--activation", "relu", "policy.activation: must be one of"),
        ("--shortcut-downsample", "pad", "policy.shortcut_downsample: must be one of"),
        ("--keep", "re:(", "policy.keep: invalid regex"),
        ("--input-size", "3,32", "--input-size takes C,H,W"),
        ("--min-in-channels", "-1", "policy.min_in_channels: must be >= 0"),
    ],
)
def test_bad_options(workdir, option, value, fragment):
    assert_one_line_error(run("convert", *SMALL, option, value, "-o", "x.safetensors"), fragment)
    assert list(workdir.iterdir()) == []


def test_inspect_missing_and_bad_files(workdir):
    assert_one_line_error(run("inspect", "missing.safetensors"), "no such file: missing.safetensors")
    (workdir / "text.safetensors").write_text("hello")
    assert_one_line_error(run("inspect", "text.safetensors"), "is not a safetensors file")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(workdir / "plain.safetensors"))
    assert_one_line_error(run("inspect", "plain.safetensors"), "not a binarize model")


def test_unexpected_errors_are_one_line_too(workdir, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(binarize, "convert", boom)
    line = assert_one_line_error(run("convert", *SMALL, "--dry-run"), "unexpected RuntimeError: something broke")
    assert "BINARIZE_DEBUG=1" in line


def test_debug_env_raises_instead(workdir):
    result = run("inspect", "missing.safetensors", env={"BINARIZE_DEBUG": "1"})
    assert result.exit_code != 0
    assert isinstance(result.exception, binarize.BinarizeError)


# ---------------------------------------------------------------------------------------------------
# The installed command, in a real process


def _command() -> list[str]:
    found = shutil.which("binarize") or str(Path(sys.executable).with_name("binarize"))
    assert Path(found).is_file(), "the binarize console script is not installed"
    return [found]


def _subprocess(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "BINARIZE_DEBUG": "0", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_console_script_converts_and_inspects(tmp_path):
    done = _subprocess([*_command(), "convert", *SMALL, "-o", "m.safetensors", "-f", "json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == _api_report("cifar_resnet20")
    assert done.stderr == "wrote m.safetensors\n"
    assert read_metadata(tmp_path / "m.safetensors")["source"]["spec"] == "cifar_resnet20"


def test_console_script_debug_shows_a_traceback(tmp_path):
    done = _subprocess([*_command(), "inspect", "nope.safetensors"], tmp_path, BINARIZE_DEBUG="1")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "FileFormatError" in done.stderr


def test_python_dash_m_binarize_cli_errors_in_one_line(tmp_path):
    done = _subprocess([sys.executable, "-m", "binarize.cli", "convert", "resnet1B", "--no-pretrained"], tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: unknown model 'resnet1B'")
    assert list(tmp_path.iterdir()) == []


def test_convert_activation_bias_option(tmp_path):
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(
        app, ["convert", "cifar_resnet20", "--no-pretrained", "--activation-bias", "-o", str(out), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["conversion"]["layer"]["activation_bias"] is True
    assert any(k.endswith(".activation_bias") for k in binarize.load(out).state_dict())


# ---------------------------------------------------------------------------------------------------
# What a new user tripped on


@pytest.fixture
def no_work(monkeypatch):
    """Fails a test in which convert starts building the model: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(binarize, "create_model", refuse)


@pytest.mark.parametrize("count", ["-3", "-1"])
def test_a_negative_number_of_classes_is_an_error(workdir, count, no_work):
    result = run("convert", *SMALL, "--num-classes", count, "-o", "x.safetensors")
    line = assert_one_line_error(
        result, f"--num-classes must be >= 0 (0 builds the model without its head), got {count}"
    )
    assert result.exit_code == 2 and line
    assert list(workdir.iterdir()) == []


def test_zero_classes_converts_a_headless_model(workdir):
    result = run("convert", *SMALL, "--num-classes", "0", "--dry-run", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert [e["name"] for e in json.loads(result.stdout)["layers"] if e["op"] == "linear"] == []


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("a_dir", "is a directory; give a file name for the output"),
        ("a_file/x.safetensors", "a_file is a file, not a directory"),
        ("a_file/sub/x.safetensors", "a_file is a file, not a directory"),
        ("/proc/x.safetensors", "cannot write /proc/x.safetensors: /proc does not accept new files"),
    ],
    ids=["directory", "under-a-file", "deep-under-a-file", "proc"],
)
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_bad_output_paths_are_one_line_before_any_work(workdir, target, fragment, force, no_work):
    (workdir / "a_dir").mkdir()
    (workdir / "a_file").write_text("keep me")
    result = run("convert", *SMALL, "-o", target, *(["--force"] if force else []))
    assert_one_line_error(result, fragment)
    assert result.exit_code == 2
    assert (workdir / "a_file").read_text() == "keep me" and list((workdir / "a_dir").iterdir()) == []


def test_an_existing_output_is_refused_before_any_work(workdir, no_work):
    (workdir / "m.safetensors").write_bytes(b"keep me")
    assert_one_line_error(run("convert", *SMALL, "-o", "m.safetensors"), "already exists", "--force")


def test_the_weights_line(workdir, messy_weights):
    weights, state = messy_weights
    result = run("convert", f"{THIS_FILE}:make_net", "--weights", weights, "--input-size", "3,16,16", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"loaded {len(state)} tensors from {weights}"]


def test_weights_for_another_label_set(workdir, messy_weights):
    """10-class weights, 5 classes asked for: everything but the head loads, one line says so, the file is marked."""
    weights, state = messy_weights
    result = run(
        "convert", f"{THIS_FILE}:make_net", "--num-classes", "5", "--weights", weights, "--input-size", "3,16,16",
        "-o", "x.safetensors",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"loaded {len(state) - 2} tensors from {weights} (head re-initialised: fc.weight, fc.bias)",
        "wrote x.safetensors",
    ]
    assert read_metadata(workdir / "x.safetensors")["source"] == {
        "spec": f"{THIS_FILE}:make_net",
        "num_classes": 5,
        "head_reset": True,
    }
    loaded = binarize.load(workdir / "x.safetensors")
    assert loaded.fc.out_features == 5
    assert torch.equal(loaded.conv2.weight, state["conv2.weight"])


def test_a_plain_pickle_weights_file_is_one_line(workdir):
    import pickle

    with (workdir / "raw.pth").open("wb") as f:
        pickle.dump(make_net().state_dict(), f)
    result = run("convert", f"{THIS_FILE}:make_net", "--weights", "raw.pth", "-o", "x.safetensors")
    assert_one_line_error(result, "raw.pth is not a weights file (it is a plain pickle written by pickle.dump")


def test_a_model_without_downloadable_weights_says_the_options(workdir):
    line = assert_one_line_error(run("convert", "cifar_resnet20", "--dry-run"))
    assert line == "error: cifar_resnet20 has no downloadable weights; pass --weights FILE or --no-pretrained"


def test_a_factory_without_num_classes_names_the_option(workdir):
    (workdir / "fixed.py").write_text("from torch import nn\n\ndef make():\n    return nn.Conv2d(3, 8, 3)\n")
    line = assert_one_line_error(run("convert", "fixed.py:make", "--num-classes", "10", "--dry-run"))
    assert line == (
        "error: make() takes no num_classes argument, but num_classes=10 was given (--num-classes); "
        "drop it or add the parameter to make()"
    )


def test_hf_hub_specs_go_to_timm_and_fail_cleanly_offline(workdir, monkeypatch):
    """``hf-hub:`` is timm's form: without the network (here: --offline, then the host not resolving) it is
    one line at once, no retries, no traceback."""
    spec = "hf-hub:timm/this-model-is-not-cached.a1_in1k"
    for args in (["--offline"], []):
        monkeypatch.setattr("binarize.cli._common.hub_unreachable", lambda host="": True)
        line = assert_one_line_error(run("convert", spec, *args, "--dry-run"))
        assert line.startswith(f"error: '{spec}' needs its configuration from the Hugging Face Hub")
        assert "connect to the network" in line
    assert_one_line_error(run("convert", "hf-hub:", "--dry-run"), "names no model")


def test_offline_is_decided_from_the_environment(monkeypatch):
    from binarize.cli._common import decide_offline

    monkeypatch.setattr("binarize.cli._common.hub_unreachable", lambda host="": True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert decide_offline(None, "resnet18", True, None) is True  # a download, and the Hub does not resolve
    assert decide_offline(None, "resnet18", False, None) is False  # nothing to download
    assert decide_offline(None, "resnet18", True, Path("w.pt")) is False  # --weights: no download
    assert decide_offline(False, "resnet18", True, None) is False  # --online
    monkeypatch.setattr("binarize.cli._common.hub_unreachable", lambda host="": False)
    assert decide_offline(None, "hf-hub:timm/resnet18.a1_in1k", False, None) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert decide_offline(None, "resnet18", True, None) is True


def test_inspect_a_directory(workdir):
    (workdir / "run").mkdir()
    assert_one_line_error(run("inspect", "run"), "run is a directory, not a model file; give a .safetensors file")


def _with_warnings(fn, warnings: tuple[str, ...]):
    from binarize.conversion.record import set_record

    def wrapped(*args, **kwargs):
        model = fn(*args, **kwargs)
        set_record(model, binarize.binarize_meta(model).replace(warnings=warnings))
        return model

    return wrapped


def test_conversion_warnings_are_printed(workdir, monkeypatch):
    """convert and inspect print the conversion record's warnings as ``warning:`` lines on stderr (JSON on stdout
    stays clean)."""
    warnings = ("no convolution found: nothing was binarized", "second warning")
    monkeypatch.setattr(binarize, "convert", _with_warnings(binarize.convert, warnings))
    result = run("convert", *SMALL, "-o", "m.safetensors", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {w}" for w in warnings] + ["wrote m.safetensors"]
    json.loads(result.stdout)
    monkeypatch.setattr(binarize, "load", _with_warnings(binarize.load, warnings))
    result = run("inspect", "m.safetensors", "-f", "json")
    assert result.exit_code == 0 and result.stderr.splitlines() == [f"warning: {w}" for w in warnings]


def no_convs(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))


def test_a_model_without_convolutions_warns(workdir):
    record = binarize.binarize_meta(binarize.convert(no_convs(), example_inputs=(torch.zeros(1, 3, 4, 4),)))
    assert record.warnings
    result = run("convert", f"{THIS_FILE}:no_convs", "--input-size", "3,4,4", "--dry-run", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
