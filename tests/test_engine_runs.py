"""Tests of what a run does around its epochs: the run directory's rules, Ctrl-C outside an epoch, stale files,
loaders built once, the validation subset, evaluate_file, and the models finetune refuses.

Runs use the tiny CNN, image folders and recipe of ``conftest.py`` (a few seconds each).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import binarize
from binarize.conversion.record import RECORD_ATTR as META_ATTR
from binarize.data import DataConfig, ResolvedData, build_eval_dataset, build_eval_loader, stratified_subset
from binarize.engine import evaluate_file, loop
from binarize.engine import step as engine_step
from binarize.engine.progress import Reporter
from binarize.errors import ConfigError, DataError, TrainingError, TrainingInterrupted
from binarize.files import read_metadata

pytestmark = pytest.mark.usefixtures("one_thread")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run(recipe, data, out=None, model=None, **kwargs) -> binarize.FinetuneResult:
    return binarize.finetune(model, recipe, data_dir=data, output_dir=out, reporter=Reporter(), **kwargs)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, tiny_recipe, tiny_data):
    """One epoch of the tiny recipe on 16 train images, validated on a subset of 9 of the 18 val images."""
    recipe = tiny_recipe("epochs=1", "train.limit_train=16", "train.limit_val=9")
    out = tmp_path_factory.mktemp("one-epoch") / "run"
    return recipe, out, run(recipe, tiny_data, out)


def val_only(tiny_data: Path, dest: Path) -> Path:
    """A copy of the tiny dataset's val/ split alone (no train/ folder)."""
    shutil.copytree(tiny_data / "val", dest / "val")
    return dest


# --------------------------------------------------------------------------- the run directory


def test_a_failed_run_leaves_no_directory(tiny_recipe, tiny_data, tmp_path, make_images):
    out = tmp_path / "deep" / "run"
    with pytest.raises(DataError, match="no data"):
        run(tiny_recipe(), None, out)
    with pytest.raises(DataError, match="does not exist"):
        run(tiny_recipe(), tmp_path / "nowhere", out)
    bad = make_images(tmp_path / "bad", classes=("a", "b", "c"), train=2, val=1, size=8)
    (bad / "val" / "c").rename(bad / "val" / "d")
    with pytest.raises(DataError, match="class folders differ"):
        run(tiny_recipe(), bad, out)
    assert not (tmp_path / "deep").exists()
    # a directory that was there before stays, with what it held
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        run(tiny_recipe(), None, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failure_in_epoch_0_leaves_no_directory(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise DataError("broken data")

    monkeypatch.setattr(loop, "evaluate", broken)
    with pytest.raises(DataError, match="broken data"):
        run(tiny_recipe("epochs=1"), tiny_data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_output_paths_are_one_line_errors_before_any_work(tiny_recipe, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    # data_dir=None: were the data read first, the error would be "no data"
    with pytest.raises(ConfigError, match=r"^output .*file is a file, not a directory: choose another --output$"):
        run(tiny_recipe(), None, file)
    with pytest.raises(ConfigError, match=r"^output .*file/run: .*file is a file, not a directory"):
        run(tiny_recipe(), None, file / "run")
    if Path("/proc/self").is_dir():
        with pytest.raises(ConfigError, match=r"^output /proc/binarize-run: cannot write in /proc \("):
            run(tiny_recipe(), None, "/proc/binarize-run")
    assert not list(tmp_path.glob(".binarize-probe-*"))


@pytest.mark.parametrize("name", ["best.safetensors", "interrupted.safetensors", "metrics.jsonl"])
def test_any_file_of_a_run_blocks_a_new_run(tiny_recipe, tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(TrainingError, match=rf"already holds a run \({name}\); pass --resume"):
        run(tiny_recipe(), None, tmp_path)
    assert (tmp_path / name).read_bytes() == b"x"


# --------------------------------------------------------------------------- Ctrl-C and stale files


@pytest.mark.parametrize("where", ["recalibrate_bn", "evaluate"])
def test_ctrl_c_during_epoch_0_saves_nothing_and_a_rerun_starts_afresh(tiny_recipe, tiny_data, tmp_path, where):
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, where, interrupt)
        with pytest.raises(TrainingInterrupted, match="before the first checkpoint.*nothing saved") as err:
            run(tiny_recipe("epochs=1"), tiny_data, out)
    assert f"{out} was not created" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    result = run(tiny_recipe("epochs=1", "train.limit_train=16"), tiny_data, out)
    assert [r["epoch"] for r in result.history] == [0, 1]


def test_ctrl_c_between_epochs_points_at_the_last_checkpoint(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_build = loop.build_optimizer

    def build_optimizer(*args, **kwargs):  # the set-up of stage 1, after epoch 0 was written
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_optimizer", build_optimizer)
    with pytest.raises(TrainingInterrupted, match=r"nothing new saved: resume with --resume.*last\.safetensors"):
        run(tiny_recipe("epochs=1", "train.limit_train=16"), tiny_data, out)
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    monkeypatch.setattr(loop, "build_optimizer", real_build)
    result = run(tiny_recipe("epochs=1", "train.limit_train=16"), tiny_data, out, resume=True)
    assert [r["epoch"] for r in result.history] == [0, 1]


def test_a_resumed_run_removes_the_stale_interrupted_file(tiny_recipe, tiny_data, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe("train.limit_train=16")  # 2 steps per epoch
    calls = []
    real_loss = engine_step.training_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2, step 1
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_step, "training_loss", loss)
        with pytest.raises(TrainingInterrupted, match="interrupted.safetensors"):
            run(recipe, tiny_data, out)
    assert (out / "interrupted.safetensors").is_file()
    run(recipe, tiny_data, out, resume=True)
    assert not (out / "interrupted.safetensors").exists()
    assert read_metadata(out / "last.safetensors")["run"]["metrics"]["epoch"] == 2


# --------------------------------------------------------------------------- loaders, limits


def test_a_fresh_run_builds_each_stages_loaders_once(tiny_recipe, tiny_data, two_stage_recipe_file, monkeypatch):
    calls = []
    real_build = loop.build_loaders

    def build_loaders(*args, **kwargs):
        calls.append(args[1])  # the batch size
        return real_build(*args, **kwargs)

    monkeypatch.setattr(loop, "build_loaders", build_loaders)
    run(tiny_recipe("epochs=1", "train.limit_train=16"), tiny_data)
    assert calls == [8]  # BatchNorm re-estimation, epoch 0 and stage 0 share them
    calls.clear()
    run(binarize.load_recipe(two_stage_recipe_file, ["train.limit_train=16"]), tiny_data)
    assert calls == [8, 8]  # one per stage


def test_limit_val_validates_on_a_fixed_balanced_subset(one_epoch, tiny_data, tmp_path):
    recipe, out, result = one_epoch
    assert [r["val_images"] for r in read_metrics(out)] == [9, 9]
    assert [r["val_images"] for r in result.history] == [9, 9]
    # evaluate_file(limit=9) evaluates the same images: it reproduces the logged metrics
    data = val_only(tiny_data, tmp_path)
    for name, record in (("last.safetensors", result.history[-1]), ("best.safetensors", result.best)):
        metrics = evaluate_file(out / name, data, workers=0, device="cpu", limit=9, batch_size=4)
        assert metrics["images"] == 9
        assert metrics["top1"] == record["val_top1"] and metrics["top5"] == record["val_top5"]
        assert metrics["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    # 3 images of each of the 3 classes, whatever the run's seed
    targets = [label for label in range(3) for _ in range(6)]
    subset = stratified_subset(targets, 9, seed=0)
    assert sorted(targets[i] for i in subset) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert subset != stratified_subset(targets, 9, seed=1)  # so the fixed seed is what makes it the same


def test_limits_above_the_dataset_size_are_errors(tiny_recipe, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^limit_train: 49 is more than the 48 images of the train split; lower"):
        run(tiny_recipe("train.limit_train=49"), tiny_data, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^limit_val: 19 is more than the 18 images of the validation split"):
        run(tiny_recipe("train.limit_val=19"), tiny_data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- evaluate_file


def test_evaluate_file_needs_only_the_evaluation_split(one_epoch, tiny_data, tmp_path):
    _, out, result = one_epoch
    data = val_only(tiny_data, tmp_path)
    assert not (data / "train").exists()
    metrics = evaluate_file(out / "last.safetensors", data, workers=0, device="cpu", batch_size=8)
    assert set(metrics) == {"top1", "top5", "loss", "images"} and metrics["images"] == 18
    model = binarize.load(out / "last.safetensors")
    resolved = ResolvedData.from_dict(read_metadata(out / "last.safetensors")["run"]["data"], "data")
    loader = build_eval_loader(build_eval_dataset(DataConfig(workers=0), tiny_data, resolved), 8, workers=0)
    assert metrics == binarize.evaluate(model, loader, torch.device("cpu"))
    (data / "val").rename(data / "test")  # the test/ split serves too
    assert evaluate_file(out / "last.safetensors", data, workers=0, device="cpu", batch_size=8) == metrics


def test_evaluate_file_errors(one_epoch, tmp_path, make_images):
    _, out, _ = one_epoch
    other = make_images(tmp_path / "other", classes=("a", "b", "c"), train=1, val=1, size=8)
    with pytest.raises(DataError, match=r"class folders of .*val differ from those the model was trained on") as err:
        evaluate_file(out / "best.safetensors", other, workers=0, device="cpu")
    assert "only in the model: blue, green, red; only in val: a, b, c" in str(err.value)
    with pytest.raises(binarize.BinarizeError, match="no such file"):
        evaluate_file(tmp_path / "none.safetensors", other, workers=0)
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        evaluate_file(out / "best.safetensors", other, batch_size=0, workers=0)
    with pytest.raises(DataError, match="no validation folder"):
        evaluate_file(out / "best.safetensors", tmp_path / "other" / "train", workers=0)


# --------------------------------------------------------------------------- models finetune refuses


def test_an_already_converted_model_is_refused(one_epoch, tiny_recipe, net_spec):
    float_model = binarize.create_model(net_spec, num_classes=3)
    converted = binarize.convert(float_model, binarize.Policy(), (torch.zeros(1, 3, 16, 16),))
    message = r"^model: this model is already converted to binary .*finetune takes the float model"
    with pytest.raises(ConfigError, match=message):
        run(tiny_recipe(), None, model=converted)
    unrecorded = copy.deepcopy(converted)
    if hasattr(unrecorded, META_ATTR):
        delattr(unrecorded, META_ATTR)
    assert binarize.binarize_meta(unrecorded) is None  # no conversion record, but ReCU layers
    with pytest.raises(ConfigError, match=message):
        run(tiny_recipe(), None, model=unrecorded)
    with pytest.raises(ConfigError, match=message):
        run(tiny_recipe(), None, model=binarize.load(one_epoch[1] / "last.safetensors"))


def test_a_float_model_with_a_reset_head_is_not_a_teacher(tiny_recipe, net_spec):
    model = binarize.create_model(net_spec, num_classes=3)
    model.binarize_source["head_reset"] = True  # what create_model(weights=..., num_classes=N) marks
    with pytest.raises(ConfigError) as err:
        run(tiny_recipe(), None, model=model)
    message = str(err.value)
    assert message.startswith("stage 'main' distils from the float model, but its head was re-initialised")
    fixes = ("train the float model on them first", "distill.teacher=SPEC", "distill.alpha=0", "distill.teacher=none")
    assert all(fix in message for fix in fixes)
    assert "\n" not in message
    # without distillation from it, the run goes on (and here stops at the missing data)
    for override in ("distill.alpha=0", "distill.teacher=none"):
        with pytest.raises(DataError, match="no data"):
            run(tiny_recipe(override), None, model=model)
    model.binarize_source["head_reset"] = False
    with pytest.raises(DataError, match="no data"):
        run(tiny_recipe(), None, model=model)


def test_the_run_directory_is_only_written_by_the_run(one_epoch):
    _, out, _ = one_epoch
    optional = {"tensorboard", "curves.png", "diagnostics.png", "weights.png"}  # they need optional packages
    names = {p.name for p in out.iterdir()} - optional
    assert names == {
        "best.safetensors",
        "last.safetensors",
        "metrics.jsonl",
        "recipe.yaml",
        "state.pt",
        "diagnostics.jsonl",
    }
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n.startswith(".binarize-probe-")]


def test_ctrl_c_in_epoch_0_without_an_output_directory(tiny_recipe, tiny_data, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "recalibrate_bn", interrupt)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted; saved nothing \(no output directory\)$"):
        run(tiny_recipe("epochs=1"), tiny_data)
