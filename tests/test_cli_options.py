"""The command line's shape: convert's options generated from ``Policy`` and ``LayerOptions``, ``--set``,
usage errors as one line, ``--version`` and the help.

The options are checked as a user reaches them: ``binarize convert ... -o FILE`` with one option set,
then the policy and layer options written in the file are compared with the value asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import binarize
from binarize.cli.main import app
from binarize.files import read_metadata

NET = f"{Path(__file__).resolve().with_name('test_cli.py')}:make_net"  # MessyNet: conv1 (3->16), conv2 (16->32), fc
SMALL = [NET, "--input-size", "3,16,16"]

# Every field, the options that set it to a value other than its default, and that value. A field without a
# row fails test_the_table_covers_every_field: a new field needs an option and a row here.
OPTIONS: dict[tuple[str, str], tuple[list[str], object]] = {
    ("policy", "keep_first"): (["--no-keep-first"], False),
    ("policy", "keep_last"): (["--no-keep-last"], False),
    ("policy", "keep_depthwise"): (["--no-keep-depthwise"], False),
    ("policy", "keep_grouped"): (["--no-keep-grouped"], False),
    ("policy", "keep_shortcut_1x1"): (["--no-keep-shortcut-1x1"], False),
    ("policy", "keep_se"): (["--no-keep-se"], False),
    ("policy", "min_in_channels"): (["--min-in-channels", "2"], 2),
    ("policy", "keep"): (["--keep", "conv2", "--keep", "re:fc"], ["conv2", "re:fc"]),
    ("policy", "binarize"): (["--binarize", "conv1"], ["conv1"]),
    ("policy", "activation"): (["--activation", "identity"], "identity"),
    ("policy", "shortcuts"): (["--shortcuts", "bireal"], "bireal"),
    ("policy", "shortcut_downsample"): (["--shortcut-downsample", "zero_pad"], "zero_pad"),
    ("layer", "binarize_weights"): (["--activations-only"], False),
    ("layer", "activation_bias"): (["--activation-bias"], True),
    ("layer", "tau"): (["--tau", "0.9"], 0.9),
}
NOT_OPTIONS = {("policy", "version")}  # the schema version: fixed, not a choice
CLASSES = {"policy": binarize.Policy, "layer": binarize.LayerOptions}

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def assert_usage_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def convert_options() -> dict[str, object]:
    command = typer.main.get_command(app).commands["convert"]
    return {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def written(tmp_path: Path, *options: str) -> dict[str, dict]:
    out = tmp_path / "m.safetensors"
    result = run("convert", *SMALL, *options, "-o", out)
    assert result.exit_code == 0, result.output
    conversion = read_metadata(out)["conversion"]
    return {"policy": conversion["policy"], "layer": conversion["layer"]}


def docstring_entry(cls: type, field: str) -> str:
    """The first words of a field's entry in the class's "Args:" section (read here independently)."""
    found = re.search(rf"^\s+{field}: (.+)$", inspect.getdoc(cls), re.MULTILINE)
    assert found, f"{cls.__name__} documents no {field}"
    return " ".join(found.group(1).replace("``", "").split()[:4])


def test_the_table_covers_every_field():
    fields = {(section, f.name) for section, cls in CLASSES.items() for f in dataclasses.fields(cls)}
    assert set(OPTIONS) | NOT_OPTIONS == fields


@pytest.mark.parametrize("key", sorted(OPTIONS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_every_field_has_an_option_with_its_help(key):
    section, field = key
    options = convert_options()
    flag = OPTIONS[key][0][0]
    assert flag in options, f"binarize convert has no {flag} for {section}.{field}"
    help_text = " ".join(options[flag].help.split())
    if flag != "--activations-only":  # an inverted flag: its own words
        assert docstring_entry(CLASSES[section], field) in help_text
    assert help_text


@pytest.mark.parametrize("key", sorted(OPTIONS), ids=lambda k: f"{k[0]}.{k[1]}")
def test_each_option_lands_in_its_field(tmp_path, key):
    """One option set: that field has the value asked for, every other field keeps its default."""
    section, field = key
    options, value = OPTIONS[key]
    got = written(tmp_path, *options)
    expected = {"policy": binarize.Policy().to_dict(), "layer": binarize.LayerOptions().to_dict()}
    expected[section][field] = value
    assert got == expected


def test_defaults_are_the_classes_defaults(tmp_path):
    assert written(tmp_path) == {"policy": binarize.Policy().to_dict(), "layer": binarize.LayerOptions().to_dict()}


def test_the_help_lists_the_fields_and_stays_rich():
    result = run("convert", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("Policy: which layers become binary", "--keep-first", "--no-keep-first", "--tau", "--set", "╭"):
        assert text in result.stdout
    assert "Examples:" in result.stdout and "--set policy.keep=[conv1]" in result.stdout


@pytest.mark.parametrize(
    ("sets", "section", "field", "value"),
    [
        (["policy.keep_first=false"], "policy", "keep_first", False),
        (["policy.keep=[conv2, conv1]"], "policy", "keep", ["conv2", "conv1"]),
        (["layer.tau=0.95"], "layer", "tau", 0.95),
        (["layer.binarize_weights=false"], "layer", "binarize_weights", False),
        (["policy.shortcuts=bireal"], "policy", "shortcuts", "bireal"),
    ],
)
def test_set_reaches_every_field(tmp_path, sets, section, field, value):
    got = written(tmp_path, *(a for s in sets for a in ("--set", s)))
    assert got[section][field] == value


def test_set_wins_over_the_options(tmp_path):
    got = written(tmp_path, "--min-in-channels", "2", "--set", "policy.min_in_channels=4", "--tau", "0.9")
    assert (got["policy"]["min_in_channels"], got["layer"]["tau"]) == (4, 0.9)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("polcy.keep_first=false", "--set polcy.keep_first=false: unknown section 'polcy'; did you mean 'policy'?"),
        ("policy.kep_first=false", "policy: unknown key 'kep_first'; did you mean 'keep_first'?"),
        ("keep_first=false", "--set takes SECTION.FIELD=VALUE (e.g. policy.FIELD=VALUE), got 'keep_first=false'"),
        ("policy.keep_first", "--set takes SECTION.FIELD=VALUE"),
        ("policy.min_in_channels=many", "policy.min_in_channels: expected an integer, got 'many'"),
        ("policy.binarize_weights=false", "policy.binarize_weights: this setting moved to the layer options"),
        ("layer.tau=2", "layer.tau: must lie in [0.5, 1], got 2.0"),
    ],
)
def test_bad_set(tmp_path, value, message):
    result = run("convert", *SMALL, "--set", value, "-o", tmp_path / "m.safetensors")
    assert message in assert_usage_error(result)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- usage errors: one line, exit 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["convert", "x", "--formt", "json"], "No such option: --formt"),
        (["convert", "x", "--format", "yaml"], "'yaml' is not one of 'table', 'json'"),
        (["convert"], "Missing argument 'model'"),
        (["convert", "x", "--min-in-channels", "abc"], "Invalid value for '--min-in-channels'"),
        (["convert", "x", "--num-classes", "ten"], "Invalid value for '--num-classes'"),
        (["inspect"], "Missing argument"),
        (["finetune", "--data", "d"], "Missing option '--recipe'"),
        (["eval", "f.safetensors", "--batch-size", "x"], "Invalid value for '--batch-size'"),
        (["recipes", "show"], "Missing argument 'name'"),
        (["nope"], "No such command 'nope'"),
        (["--nope"], "No such option: --nope"),
    ],
)
def test_usage_errors_are_one_line(args, fragment):
    line = assert_usage_error(run(*args))
    assert fragment in line and "--help" in line


def test_usage_error_of_the_installed_command(tmp_path):
    command = shutil.which("binarize") or str(Path(sys.executable).with_name("binarize"))
    env = {**os.environ, "BINARIZE_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [command, "convert", "x", "--formt", "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "error: No such option: --formt (Possible options: --force, --format) (see 'binarize convert --help')\n"
    )


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"binarize {binarize.__version__}\n"


def test_top_level_help_lists_each_command_on_its_own():
    result = run("--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Examples" not in result.stdout  # the commands' examples are in their own --help only
    for command in ("convert", "finetune", "eval", "inspect", "demo", "recipes", "--version"):
        assert command in result.stdout
    assert "Examples:" in run("finetune", "--help", env={"COLUMNS": "200"}).stdout


def test_no_arguments_prints_the_help():
    result = run()
    assert "Usage: binarize" in result.stdout and "error:" not in result.stderr
