"""Tests of the fine-tuning commands: ``binarize finetune``, ``eval``, ``recipes`` and ``demo``.

Every user error must end the command with one ``error: ...`` line on stderr, no traceback and a
non-zero exit code. A real two-process torchrun job (gloo, CPU) checks distributed training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import binarize
from binarize.cli.main import app
from binarize.data import DataConfig, ResolvedData, build_datasets
from binarize.engine import step as engine_step
from binarize.files import read_metadata
from binarize.recipes import list_recipes, load_recipe

slow = pytest.mark.slow
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, pattern: str, code: int = 2) -> str:
    """The command failed with ``code`` and one ``error:`` line matching ``pattern``, as its last line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def evaluate_file(path: Path, data_root: Path) -> dict[str, float]:
    resolved = ResolvedData.from_dict(read_metadata(path)["run"]["data"], "data")
    loader = DataLoader(build_datasets(DataConfig(workers=0), data_root, resolved).val, batch_size=8)
    return binarize.evaluate(binarize.load(path), loader, torch.device("cpu"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_recipe_file, tiny_data):
    """``binarize finetune`` of the tiny recipe for one epoch; returns the run directory."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("finetune", "--recipe", tiny_recipe_file, "--data", tiny_data, "-o", run_dir, "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert re.search(r"best: epoch \d top-1 [\d.]+% -> .*best\.safetensors", result.stderr)
    return run_dir


# --------------------------------------------------------------------------- finetune and eval


def test_finetune_writes_the_run(cli_run, tiny_recipe_file):
    for name in ("last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl", "recipe.yaml"):
        assert (cli_run / name).is_file()
    assert [r["epoch"] for r in read_metrics(cli_run)] == [0, 1]
    assert load_recipe(cli_run / "recipe.yaml") == load_recipe(tiny_recipe_file, ["epochs=1"])


def test_eval_prints_the_logged_accuracy_as_json(cli_run, tiny_data):
    best = max(read_metrics(cli_run), key=lambda r: r["val_top1"])
    result = invoke("eval", cli_run / "best.safetensors", "--data", tiny_data, "--format", "json", "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"top1", "top5", "loss", "images"}
    assert metrics["top1"] == best["val_top1"] and metrics["top5"] == best["val_top5"]
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert metrics["images"] == 18
    table = invoke("eval", cli_run / "last.safetensors", "--data", tiny_data, "--batch-size", "4", "--workers", "0")
    assert table.exit_code == 0 and "images" in table.stdout and "18" in table.stdout


def test_eval_errors(cli_run, tiny_data, tmp_path, make_images):
    assert_clean_error(invoke("eval", tmp_path / "none.safetensors", "--data", tiny_data), "no such file")
    other = make_images(tmp_path / "other", classes=("a", "b", "c"), train=1, val=1, size=8)
    assert_clean_error(
        invoke("eval", cli_run / "best.safetensors", "--data", other, "--workers", "0"), "class folders of .* differ"
    )


def test_resume_through_the_cli(cli_run, tiny_recipe_file, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run, run_dir)
    result = invoke(
        "finetune", "--recipe", tiny_recipe_file, "--data", tiny_data, "-o", run_dir, "--epochs", "2", "--resume"
    )
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert read_metrics(run_dir)[:2] == read_metrics(cli_run)


def test_options_with_awkward_paths_reach_the_recipe(tmp_path):
    from binarize.cli.finetune import recipe_from_options

    weights = tmp_path / "exp #2" / "w: final.pt"
    recipe = recipe_from_options(
        "cifar10-resnet20-posthoc", "nets/v1 #3/net.py:make", weights, False, 7, 3, 16, 100, "cpu", ["epochs=4"]
    )
    assert recipe.model.spec == "nets/v1 #3/net.py:make" and recipe.model.weights == str(weights.resolve())
    assert (recipe.model.pretrained, recipe.model.num_classes, recipe.train.device) == (False, 7, "cpu")
    assert (recipe.stages[0].epochs, recipe.stages[0].batch_size, recipe.train.limit_train) == (4, 16, 100)


# --------------------------------------------------------------------------- errors: one line, non-zero exit


def finetune(recipe, data, out, *extra):
    return invoke("finetune", "--recipe", recipe, "--data", data, "-o", out, *extra)


def test_missing_data(tiny_recipe_file, tmp_path):
    assert_clean_error(
        finetune(tiny_recipe_file, tmp_path / "nope", tmp_path / "o"), r"data directory .*nope does not exist"
    )
    result = invoke("finetune", "--recipe", tiny_recipe_file, "-o", tmp_path / "o")
    assert_clean_error(result, r"no data: pass --data DIR")


def test_empty_dataset(tiny_recipe_file, tmp_path, make_images):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    assert_clean_error(finetune(tiny_recipe_file, root, tmp_path / "o"), r"train has no class folders")
    root = make_images(tmp_path / "data2", classes=("cat", "dog"), train=2, val=2, size=8)
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    assert_clean_error(
        finetune(tiny_recipe_file, root, tmp_path / "o"), r"1 class folder\(s\) in .*train have no images.*: dog"
    )


def test_class_folders_differ_between_splits(tiny_recipe_file, tmp_path, make_images):
    root = make_images(tmp_path / "data", classes=("a", "b", "c"), train=2, val=1, size=8)
    (root / "val" / "c").rename(root / "val" / "d")
    assert_clean_error(
        finetune(tiny_recipe_file, root, tmp_path / "o"), r"class folders differ .*only in train: c; only in val: d"
    )


def test_corrupt_image_and_a_clean_rerun(tiny_recipe_file, tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    bad = root / "val" / "green" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    out = tmp_path / "run"
    assert_clean_error(finetune(tiny_recipe_file, root, out, "--epochs", "1"), r"cannot decode image .*002\.png")
    # the run never reached its first checkpoint: once the file is gone the same command starts afresh
    bad.unlink()
    result = finetune(tiny_recipe_file, root, out, "--epochs", "1", "--limit-train", "16")
    assert result.exit_code == 0, result.output
    assert read_metrics(out)[0]["val_images"] == 17


def test_limit_val_option(tiny_recipe_file, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = finetune(tiny_recipe_file, tiny_data, out, "--epochs", "1", "--limit-train", "16", "--limit-val", "9")
    assert result.exit_code == 0, result.output
    assert [r["val_images"] for r in read_metrics(out)] == [9, 9]
    assert binarize.load_recipe(out / "recipe.yaml").train.limit_val == 9


def test_misspelt_key_in_a_recipe_file(tiny_recipe_file, tiny_data, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(tiny_recipe_file.read_text().replace("batch_size:", "bacth_size:"))
    assert_clean_error(
        finetune(path, tiny_data, tmp_path / "o"), r"stages\[0\]: unknown key 'bacth_size'; did you mean 'batch_size'\?"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_name(tiny_data, tmp_path):
    assert_clean_error(
        finetune("cifar10-resnet20-posthok", tiny_data, tmp_path / "o"),
        r"unknown recipe 'cifar10-resnet20-posthok'; did you mean 'cifar10-resnet20",
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.optimizer.lrr=0.1", r"--set stages\.0\.optimizer\.lrr=0\.1: unknown key 'lrr'; did you mean 'lr'"),
        ("stages.2.epochs=1", r"'2' is not a valid index \(0 to 0\)"),
        ("epochs=many", r"stages\[0\]\.epochs: expected an integer, got 'many'"),
        ("stages.0.optimizer.lr=-1", r"stages\[0\]\.optimizer\.lr: must be > 0"),
        ("lr", r"--set takes key=value"),
    ],
)
def test_bad_set(tiny_recipe_file, tiny_data, tmp_path, override, message):
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--set", override), message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["block_reconstruction.fraction=1"], r"stages\[0\]\.block_reconstruction\.fraction: must lie in \[0, 1\)"),
        (["block_reconstruction.fraction=0.5"], r"block_reconstruction\.layers: name the block boundaries"),
        (
            ["block_reconstruction.fraction=0.5", "block_reconstruction.layers=[act9]"],
            r"block_reconstruction\.layers: 'act9' matches no module of both the student and the teacher; closest: act",
        ),
        (["feature_distill.weight=1", "feature_distill.layers=[bn1]", "distill.teacher=none"], r"needs a teacher"),
        (["train.calibrate_thresholds=true"], r"train\.calibrate_thresholds: .* set layer\.activation_bias: true"),
        (["train.bn_refresh_batches=-2"], r"train\.bn_refresh_batches: must be >= 0"),
    ],
)
def test_bad_recovery_options_stop_before_any_work(tiny_recipe_file, tiny_data, tmp_path, overrides, message):
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, tmp_path / "o", *sets), message)
    assert not (tmp_path / "o").exists()


def test_model_classes_differ_from_the_dataset(tiny_recipe_file, tiny_data, tmp_path):
    assert_clean_error(
        finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--num-classes", "5"),
        r"the model outputs 5 classes but the dataset has 3; pass --num-classes 3",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(cli_run, tiny_recipe_file, tiny_data, tmp_path):
    message = r"device: 'cuda' asked for, but no CUDA device is available; use cpu or auto"
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--device", "cuda"), message)
    assert not (tmp_path / "o").exists()
    assert_clean_error(invoke("eval", cli_run / "best.safetensors", "--data", tiny_data, "--device", "cuda"), message)


def test_an_existing_run_is_never_overwritten(cli_run, tiny_recipe_file, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run, run_dir)
    before = snapshot(run_dir)
    message = assert_clean_error(finetune(tiny_recipe_file, tiny_data, run_dir), r"already holds a run")
    assert "--resume" in message
    assert snapshot(run_dir) == before


def test_resume_with_nothing_to_resume(tiny_recipe_file, tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, empty, "--resume"), r"nothing to resume in .*empty")
    assert list(empty.iterdir()) == []
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, tmp_path / "none", "--resume"), "nothing to resume")
    assert not (tmp_path / "none").exists()


def test_non_finite_loss(tiny_recipe_file, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = finetune(
        tiny_recipe_file, tiny_data, out, "--set", "stages.0.optimizer.lr=1e30", "--set", "schedule.warmup_epochs=0"
    )
    assert_clean_error(result, r"the loss became non-finite in epoch 1 .*last good checkpoint is kept")
    model = binarize.load(out / "last.safetensors")  # epoch 0, the converted model
    assert read_metadata(out / "last.safetensors")["run"]["metrics"]["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert [r["epoch"] for r in read_metrics(out)] == [0]


def test_ctrl_c_saves_exits_130_and_resumes(tiny_recipe_file, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_loss = engine_step.training_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # epoch 2, step 3
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(engine_step, "training_loss", loss)
    message = assert_clean_error(finetune(tiny_recipe_file, tiny_data, out), r"interrupted in stage 'main'", code=130)
    assert "interrupted.safetensors" in message
    binarize.load(out / "interrupted.safetensors")
    assert read_metadata(out / "last.safetensors")["run"]["metrics"]["epoch"] == 1
    last = load_file(out / "last.safetensors")
    monkeypatch.undo()
    result = finetune(tiny_recipe_file, tiny_data, out, "--resume")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]
    assert any(not torch.equal(t, load_file(out / "last.safetensors")[k]) for k, t in last.items())


def test_a_failed_finetune_leaves_no_output_directory(tiny_recipe_file, tiny_data, tmp_path, make_images):
    out = tmp_path / "runs" / "r1"
    assert_clean_error(invoke("finetune", "--recipe", tiny_recipe_file, "-o", out), r"no data: pass --data DIR")
    assert_clean_error(finetune(tiny_recipe_file, tmp_path / "nope", out), r"data directory .*nope does not exist")
    bad = make_images(tmp_path / "bad", classes=("a", "b", "c"), train=2, val=1, size=8)
    (bad / "val" / "c").rename(bad / "val" / "d")
    assert_clean_error(finetune(tiny_recipe_file, bad, out), r"class folders differ")
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, out, "--limit-train", "1000"), r"limit_train: 1000 is")
    assert not (tmp_path / "runs").exists()


def test_a_bad_output_path_is_one_line(tiny_recipe_file, tiny_data, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, file), r"output .*file is a file, not a directory")
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, file / "run"), r"file is a file, not a directory")


def test_ctrl_c_in_epoch_0_exits_130_and_saves_nothing(tiny_recipe_file, tiny_data, tmp_path, monkeypatch):
    from binarize.engine import loop

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "recalibrate_bn", interrupt)
    out = tmp_path / "run"
    message = assert_clean_error(finetune(tiny_recipe_file, tiny_data, out), r"before the first checkpoint", code=130)
    assert "nothing saved" in message and not out.exists()


# --------------------------------------------------------------------------- checked before any work; the weights line


@pytest.fixture
def finetune_calls(monkeypatch):
    """Replaces the library's finetune: records what the command passes, trains nothing."""
    calls = []

    def fake(model, recipe, **kwargs):
        calls.append((model, recipe, kwargs))
        return binarize.FinetuneResult(model, {"epoch": 1, "val_top1": 50.0}, [], kwargs.get("output_dir"))

    monkeypatch.setattr(binarize, "finetune", fake)
    return calls


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        ("a_file", r"output .*a_file is a file, not a directory: choose another --output"),
        ("a_file/run", r"cannot write .*a_file/run: .*a_file is a file, not a directory"),
        ("/proc/run", r"cannot write /proc/run: /proc does not accept new files"),
    ],
    ids=["file", "under-a-file", "proc"],
)
def test_finetune_bad_output_before_any_work(tiny_recipe_file, tiny_data, tmp_path, target, pattern, finetune_calls):
    (tmp_path / "a_file").write_text("keep me")
    out = target if target.startswith("/") else tmp_path / target
    assert_clean_error(finetune(tiny_recipe_file, tiny_data, out), pattern)
    assert finetune_calls == [] and (tmp_path / "a_file").read_text() == "keep me"


def test_finetune_negative_num_classes(tiny_recipe_file, tiny_data, tmp_path, finetune_calls):
    assert_clean_error(
        finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--num-classes", "-3"), r"--num-classes must be >= 0"
    )
    assert finetune_calls == []


def test_finetune_says_what_the_weights_loaded(tiny_recipe_file, tiny_data, tmp_path, tiny_models, finetune_calls):
    """One line per file: how many tensors, and the head re-initialised when the classes differ; the float model
    passed on is marked (the engine refuses to distil from its untrained head)."""
    for classes, suffix, marked in ((3, "", False), (5, " (head re-initialised: fc.weight, fc.bias)", True)):
        weights = tmp_path / f"net{classes}.pt"
        state = binarize.create_model(f"{tiny_models}:make_net", num_classes=classes).state_dict()
        torch.save(state, weights)
        result = finetune(tiny_recipe_file, tiny_data, tmp_path / f"o{classes}", "--weights", weights)
        assert result.exit_code == 0, result.output
        loaded = len(state) - (2 if marked else 0)
        assert result.stderr.splitlines()[0] == f"loaded {loaded} tensors from {weights.resolve()}{suffix}"
        model = finetune_calls[-1][0]
        assert model.binarize_source.get("head_reset", False) is marked
        assert model.fc.out_features == 3


def test_finetune_factory_without_num_classes(tiny_recipe_file, tiny_data, tmp_path, finetune_calls):
    (tmp_path / "fixed.py").write_text("from torch import nn\n\ndef make():\n    return nn.Conv2d(3, 8, 3)\n")
    spec = str(tmp_path / "fixed.py") + ":make"
    line = assert_clean_error(finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--model", spec), "num_classes")
    assert "num_classes=3 was given (the recipe's model.num_classes)" in line
    line = assert_clean_error(
        finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--model", spec, "--num-classes", "4"), "num_classes"
    )
    assert "num_classes=4 was given (--num-classes)" in line
    assert finetune_calls == []


def test_finetune_without_downloadable_weights(tiny_recipe_file, tiny_data, tmp_path, finetune_calls):
    line = assert_clean_error(
        finetune(tiny_recipe_file, tiny_data, tmp_path / "o", "--model", "cifar_resnet20", "--pretrained"),
        "no downloadable weights",
    )
    assert line.endswith("pass --weights FILE or --no-pretrained (the recipe's model.pretrained)")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--epochs", "0"], r"^error: --epochs must be >= 1 "),
        (["-o", "{run}"], r"^error: --output .*run is not empty; the demo starts a new run every time"),
        (["-o", "{file}"], r"^error: output .*a_file is a file, not a directory"),
        (["-o", "{file}/run"], r"a_file is a file, not a directory"),
    ],
    ids=["epochs", "existing-run", "file", "under-a-file"],
)
def test_demo_checks_its_options_first(args, pattern, tmp_path, monkeypatch):
    """Before the float CNN is trained, in the demo's own words (it has no --resume)."""

    def refuse(*a, **k):
        raise AssertionError("the demo started training")

    monkeypatch.setattr("binarize.cli.demo.run_demo", refuse)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "a_file").write_text("x")
    result = invoke("demo", *(a.format(run=tmp_path / "run", file=tmp_path / "a_file") for a in args))
    line = assert_clean_error(result, pattern)
    assert "--resume" not in line and "Training" not in result.stdout


def test_run_demo_checks_before_training(tmp_path, monkeypatch):
    import binarize.demo
    from binarize.errors import ConfigError

    def refuse(*a, **k):
        raise AssertionError("the demo started training")

    monkeypatch.setattr(binarize.demo, "_train_float", refuse)
    with pytest.raises(ConfigError, match="binary_epochs: the demo trains for at least 1 epoch, got 0"):
        binarize.demo.run_demo(binary_epochs=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="output_dir: .*run is not empty; the demo starts a new run every time"):
        binarize.demo.run_demo(output_dir=tmp_path / "run")


# --------------------------------------------------------------------------- recipes


def test_recipes_lists_each_on_one_line():
    result = invoke("recipes")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(list_recipes())
    for line, (name, description) in zip(lines, list_recipes().items(), strict=True):
        assert line.split()[0] == name and line.endswith(description)


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_recipes_show_prints_yaml_that_loads_to_the_same_recipe(name, tmp_path):
    result = invoke("recipes", "show", name)
    assert result.exit_code == 0
    path = tmp_path / f"{name}.yaml"
    path.write_text(result.stdout)
    assert load_recipe(path) == load_recipe(name)


def test_recipes_show_unknown_name():
    assert_clean_error(invoke("recipes", "show", "imagenet-resnet81"), r"unknown recipe 'imagenet-resnet81'")


# --------------------------------------------------------------------------- torchrun


def torchrun(out: Path, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "binarize.cli.main", "finetune", "-o", str(out), *map(str, args),
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_two_process_gloo_run(two_stage_recipe_file, make_images, tmp_path):
    """Two processes on the CPU, two stages (stage 1 leaves the scales unused), uneven validation shards."""
    data = make_images(tmp_path / "data", train=8, val=3)  # 24 train images: 12 per process; 9 val: 5 and 4
    recipe = tmp_path / "two-stage.yaml"
    recipe.write_text(two_stage_recipe_file.read_text().replace("batch_size: 8", "batch_size: 4"))
    out = tmp_path / "run"
    proc = torchrun(out, "--recipe", recipe, "--data", data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(re.findall(r"best: epoch", proc.stderr)) == 1  # only the main process reports
    # files written once, by the main process
    optional = {"curves.png", "tensorboard", "diagnostics.png", "weights.png"}  # they need optional packages
    names = {p.name for p in out.iterdir()} - optional
    expected = {"best.safetensors", "last.safetensors", "metrics.jsonl", "recipe.yaml", "state.pt", "diagnostics.jsonl"}
    assert names == expected
    records = read_metrics(out)
    assert [(r["epoch"], r["stage"]) for r in records] == [
        (0, "converted"),
        (1, "float-weights"),
        (2, "binary-weights"),
    ]
    assert all(r["val_images"] == 9 for r in records)  # both shards counted, none twice
    assert records[1]["images_per_s"] > 0 and records[1]["train_loss"] > 0
    # the summed metrics are those of the saved model on the whole validation set
    for name in ("best.safetensors", "last.safetensors"):
        logged = read_metadata(out / name)["run"]["metrics"]
        metrics = evaluate_file(out / name, data)
        assert metrics["images"] == 9
        assert metrics["top1"] == logged["val_top1"]
        assert metrics["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_two_process_run_stops_cleanly_on_a_non_finite_loss(tiny_recipe_file, make_images, tmp_path):
    """Both processes stop with the error; the kept checkpoint (the converted model, BatchNorm statistics
    re-estimated on each process's shard) is the one whose metrics were logged."""
    data = make_images(tmp_path / "data", train=8, val=3)
    out = tmp_path / "run"
    proc = torchrun(
        out,
        "--recipe",
        tiny_recipe_file,
        "--data",
        data,
        "--set",
        "optimizer.lr=1e30",
        "--set",
        "schedule.warmup_epochs=0",
    )
    assert proc.returncode != 0  # (torchrun itself then prints a traceback of its own)
    # one line from each process (the two may be written into each other's)
    assert len(re.findall(r"error: the (validation )?loss became non-finite in epoch 1", proc.stderr)) == 2, proc.stderr
    assert proc.stderr.count("error:") == 2
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    logged = read_metadata(out / "last.safetensors")["run"]["metrics"]
    metrics = evaluate_file(out / "last.safetensors", data)
    assert (logged["epoch"], logged["val_images"], metrics["images"]) == (0, 9, 9)
    assert metrics["top1"] == logged["val_top1"]
    assert metrics["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


# --------------------------------------------------------------------------- demo


@slow
def test_demo_command():
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for label in ("float CNN", "binary, converted", "fine-tuned 8 epochs", "fp32", "packed file", "1-bit"):
        assert label in text
    float_top1, converted, finetuned, packed = (float(v) for v in re.findall(r"(\d+\.\d)%", text)[:4])
    assert float_top1 > 90 and finetuned > converted + 30 and packed == finetuned
    assert re.search(r"size on disk: [\d.]+ KiB float -> [\d.]+ KiB packed \([\d.]+x smaller\); latency", text)
