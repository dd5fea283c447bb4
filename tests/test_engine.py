"""Tests of binarize.engine: schedules, a whole run and its files, resume, stages, distillation, parameter
groups, non-finite losses, interruption, precision, and the demo.

Runs use the tiny CNN and image folders of ``conftest.py`` (a few seconds each); ``-m slow`` adds
``torch.compile`` and a real CIFAR-10 fine-tune of the pretrained ResNet-20.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _shared_data import SHARED, extract_cifar10
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import binarize
from binarize.data import DataConfig, ResolvedData, build_datasets
from binarize.engine import checkpoint as ckpt
from binarize.engine import loop
from binarize.engine import step as engine_step
from binarize.engine.losses import distribution_loss, training_loss
from binarize.engine.optim import ROLES, build_optimizer, parameter_roles
from binarize.engine.progress import Reporter
from binarize.engine.schedules import lr_at, tau_at
from binarize.engine.teachers import Teachers
from binarize.errors import TrainingError, TrainingInterrupted
from binarize.files import read_metadata
from binarize.nn import ReCUConv2d
from binarize.recipes import DistillConfig, MethodConfig, OptimizerConfig, ScheduleConfig, WeightDecayConfig

slow = pytest.mark.slow
pytestmark = pytest.mark.usefixtures("one_thread")
METRIC_KEYS = {"epoch", "tau", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds"}
TIMING_KEYS = ("seconds", "images_per_s")

# --------------------------------------------------------------------------- helpers


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def file_metrics(path: Path) -> dict:
    return read_metadata(path)["run"]["metrics"]


def val_loader(model_file: Path, data_root: Path, batch_size: int = 8) -> DataLoader:
    """The validation images prepared as the run that wrote ``model_file`` prepared them."""
    resolved = ResolvedData.from_dict(read_metadata(model_file)["run"]["data"], "data")
    return DataLoader(build_datasets(DataConfig(workers=0), data_root, resolved).val, batch_size=batch_size)


class Spy:
    """Wraps ``step.training_loss`` and ``step.to_device`` and records every training step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> None:
        self.steps: list[dict] = []
        self.last_images: torch.Tensor | None = None
        self.interrupt_at = interrupt_at
        real_loss, real_to_device = engine_step.training_loss, engine_step.to_device

        def to_device(images, labels, device, channels_last):
            images, labels = real_to_device(images, labels, device, channels_last)
            self.last_images = images
            return images, labels

        def loss(logits, labels, teacher_logits, distill, label_smoothing=0.0):
            if self.interrupt_at is not None and len(self.steps) + 1 == self.interrupt_at:
                raise KeyboardInterrupt
            value = real_loss(logits, labels, teacher_logits, distill, label_smoothing)
            self.steps.append(
                {
                    "images": self.last_images.detach().clone(),
                    "logits": logits.detach().clone(),
                    "labels": labels.clone(),
                    "teacher_logits": None if teacher_logits is None else teacher_logits.detach().clone(),
                    "loss": value.detach().clone(),
                }
            )
            return value

        monkeypatch.setattr(engine_step, "to_device", to_device)
        monkeypatch.setattr(engine_step, "training_loss", loss)


class FileCopier(Reporter):
    """Copies the checkpoint files when epoch ``epoch`` (1-based) of ``stage`` starts, and can then interrupt."""

    def __init__(self, run_dir: Path, stage: str, epoch: int, dest: Path, interrupt: bool = False) -> None:
        self.run_dir, self.stage, self.epoch, self.dest, self.interrupt = run_dir, stage, epoch, dest, interrupt

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, stage: str) -> None:
        if (stage, epoch) == (self.stage, self.epoch):
            self.dest.mkdir(parents=True)
            for name in ("last.safetensors", "state.pt"):
                shutil.copy2(self.run_dir / name, self.dest / name)
            if self.interrupt:
                raise KeyboardInterrupt


# --------------------------------------------------------------------------- schedules


def test_tau_follows_the_papers_formula():
    method = MethodConfig(tau_min=0.85, tau_max=0.99)
    a = (0.99 - 0.85) / (math.e - 1)
    assert a == pytest.approx(0.08148, abs=5e-6)
    assert 0.85 - a == pytest.approx(0.76852, abs=5e-6)
    assert tau_at(0, 600, method) == pytest.approx(0.85, abs=1e-12)
    assert tau_at(600, 600, method) == pytest.approx(0.99, abs=1e-12)
    # recu.md section 1.3: the last epoch of a run (t = T - 1) never reaches tau_max
    assert round(tau_at(599, 600, method), 5) == 0.98963
    assert round(tau_at(255, 256, method), 5) == 0.98914
    assert round(tau_at(199, 200, method), 5) == 0.98890
    # the table of schedule values in recu.md
    for share, expected in ((0.25, 0.873), (0.5, 0.903), (0.75, 0.941)):
        assert round(tau_at(share * 200, 200, method), 3) == expected
    values = [tau_at(t, 200, method) for t in range(200)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert tau_at(3, 10, MethodConfig(tau_min=0.9, tau_max=0.9)) == pytest.approx(0.9)


def test_lr_warmup_then_cosine():
    schedule = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.001)
    lrs = [lr_at(step, 10, 5, 0.1, schedule) for step in range(50)]
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(0.1)
    # cosine from the end of warm-up (step 10) to min_lr at step 50
    for step in (10, 20, 30, 40, 49):
        expected = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - 10) / 40))
        assert lrs[step] == pytest.approx(expected)
    assert lrs[30] == pytest.approx((0.1 + 0.001) / 2)
    assert lr_at(50, 10, 5, 0.1, schedule) == pytest.approx(0.001)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(0, 10, 5, 0.1, ScheduleConfig(name="cosine")) == pytest.approx(0.1)  # no warm-up


def test_lr_step_and_constant():
    step = ScheduleConfig(name="step", milestones=(2, 4), gamma=0.5)
    per_epoch = [lr_at(e * 4 + 1, 4, 6, 0.2, step) for e in range(6)]
    assert per_epoch == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.05])
    constant = ScheduleConfig(name="constant", warmup_epochs=0.5)
    assert [lr_at(s, 4, 3, 0.2, constant) for s in range(5)] == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2])


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_recipe, tiny_data):
    """The tiny recipe, two epochs straight, with an output directory."""
    recipe = tiny_recipe()
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    return recipe, run_dir, result


def test_run_writes_its_files_and_metrics(straight_run):
    recipe, run_dir, result = straight_run
    for name in ("last.safetensors", "best.safetensors", "state.pt", "metrics.jsonl", "recipe.yaml"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "interrupted.safetensors").exists()
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        assert METRIC_KEYS <= r.keys()
        assert r["val_images"] == 18
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100 and math.isfinite(r["val_loss"])
    converted, trained = records[0], records[1:]
    assert converted["train_loss"] is None and converted["seconds"] is None and converted["lr"] == 0.0
    for r in trained:
        assert math.isfinite(r["train_loss"]) and r["images_per_s"] > 0 and r["seconds"] > 0 and r["lr"] > 0
    # the resolved recipe beside the run loads to the same Recipe
    assert binarize.load_recipe(run_dir / "recipe.yaml") == recipe
    # the result mirrors the files
    assert result.history == records
    assert result.best == max(records, key=lambda r: r["val_top1"])
    assert result.output_dir == run_dir
    assert_same_tensors(result.model.state_dict(), load_file(run_dir / "last.safetensors"))
    state = ckpt.load_state(run_dir)
    assert (state["stage"], state["epoch"]) == (0, 2) and state["best"] == result.best


def test_logged_tau_is_the_schedule_and_reaches_the_layers(straight_run):
    recipe, run_dir, result = straight_run
    records = read_metrics(run_dir)
    method, epochs = recipe.method, recipe.stages[0].epochs
    assert records[0]["tau"] == tau_at(0, epochs, method)
    for r in records[1:]:
        assert r["tau"] == tau_at(r["epoch"] - 1, epochs, method)
    assert records[2]["tau"] > records[1]["tau"] == recipe.method.tau_min
    taus = [m.tau.item() for m in result.model.modules() if isinstance(m, ReCUConv2d)]
    assert len(taus) == 2 and taus == pytest.approx([records[-1]["tau"]] * 2)


def test_tau_per_step(tiny_recipe, tiny_data, monkeypatch):
    calls = []
    real_step = engine_step.training_loss

    def training_loss(logits, *args, **kwargs):  # called once per training step, after the forward
        calls.append(seen[-1])
        return real_step(logits, *args, **kwargs)

    seen = []
    real_convert = loop.convert

    def convert(*args, **kwargs):  # record the tau the first binary layer holds at every training forward
        model = real_convert(*args, **kwargs)
        layer = next(m for m in model.modules() if isinstance(m, ReCUConv2d))
        layer.register_forward_pre_hook(lambda m, a: seen.append(m.tau.item()) if m.training else None)
        return model

    monkeypatch.setattr(loop, "convert", convert)
    monkeypatch.setattr(engine_step, "training_loss", training_loss)
    recipe = tiny_recipe("method.granularity=step", "train.limit_train=16")  # 2 epochs of 2 steps
    result = binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    tau = [tau_at(t, 2, recipe.method) for t in (0, 0.5, 1, 1.5)]
    # the tau of every training step: tau(epoch + i / steps)
    assert calls == pytest.approx(tau, abs=1e-7)
    assert [r["tau"] for r in result.history] == [tau[0], tau[0], tau[2]]
    layer_taus = [m.tau.item() for m in result.model.modules() if isinstance(m, ReCUConv2d)]
    assert layer_taus == pytest.approx([tau[3]] * 2, abs=1e-7)


def test_logged_lr_is_the_schedule(straight_run):
    recipe, run_dir, _ = straight_run
    stage, steps = recipe.stages[0], 48 // 8
    for r in read_metrics(run_dir)[1:]:
        last_step = r["epoch"] * steps - 1
        assert r["lr"] == pytest.approx(lr_at(last_step, steps, stage.epochs, stage.optimizer.lr, stage.schedule))


def test_best_and_last_files_reproduce_the_logged_metrics(straight_run, tiny_data):
    _, run_dir, result = straight_run
    records = read_metrics(run_dir)
    for name, record in (("best.safetensors", result.best), ("last.safetensors", records[-1])):
        path = run_dir / name
        assert file_metrics(path) == record
        model = binarize.load(path)
        metrics = binarize.evaluate(model, val_loader(path, tiny_data), torch.device("cpu"))
        assert metrics["top1"] == record["val_top1"]
        assert metrics["top5"] == record["val_top5"]
        assert metrics["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
        assert metrics["images"] == 18


def test_the_converted_model_and_the_teacher_are_left_alone(tiny_recipe, tiny_data, net_spec, monkeypatch):
    float_model = binarize.create_model(net_spec, num_classes=3)
    before = copy.deepcopy(float_model.state_dict())
    spy = Spy(monkeypatch)
    recipe = tiny_recipe("epochs=1", "train.limit_train=16")
    result = binarize.finetune(float_model, recipe, data_dir=tiny_data, reporter=Reporter())
    assert result.output_dir is None and [r["epoch"] for r in result.history] == [0, 1]
    assert len(spy.steps) == 2
    assert_same_tensors(float_model.state_dict(), before)  # the teacher never trains
    float_model.eval()
    with torch.no_grad():
        for step in spy.steps:
            # distill.teacher=float: the teacher is the float model before conversion
            torch.testing.assert_close(step["teacher_logits"], float_model(step["images"]), rtol=0, atol=1e-6)
            assert not torch.allclose(step["teacher_logits"], step["logits"], atol=1e-3)
            expected = 0.5 * distribution_loss(step["logits"], step["teacher_logits"]) + 0.5 * F.cross_entropy(
                step["logits"], step["labels"]
            )
            torch.testing.assert_close(step["loss"], expected)
    assert not any(isinstance(m, ReCUConv2d) for m in float_model.modules())


# --------------------------------------------------------------------------- resume


def test_interrupt_then_resume_is_bit_identical(straight_run, tiny_recipe, tiny_data, tmp_path, monkeypatch):
    recipe, straight_dir, straight = straight_run
    run_dir = tmp_path / "run"
    epoch_one = tmp_path / "after-epoch-1"
    spy = Spy(monkeypatch, interrupt_at=6 + 3)  # 6 steps per epoch: the third step of epoch 2
    with pytest.raises(TrainingInterrupted, match="interrupted.safetensors"):
        binarize.finetune(
            None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=FileCopier(run_dir, "main", 2, epoch_one)
        )
    assert len(spy.steps) == 8
    # Ctrl-C keeps the last complete epoch untouched and saves the interrupted weights beside it
    assert (run_dir / "last.safetensors").read_bytes() == (epoch_one / "last.safetensors").read_bytes()
    assert (run_dir / "state.pt").read_bytes() == (epoch_one / "state.pt").read_bytes()
    assert file_metrics(run_dir / "last.safetensors")["epoch"] == 1
    interrupted = binarize.load(run_dir / "interrupted.safetensors").state_dict()
    assert not all(torch.equal(t, interrupted[k]) for k, t in load_file(run_dir / "last.safetensors").items())
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]
    monkeypatch.undo()
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter())
    assert_same_tensors(load_file(run_dir / "last.safetensors"), load_file(straight_dir / "last.safetensors"))
    assert_same_tensors(result.model.state_dict(), straight.model.state_dict())
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(straight_dir))
    assert without_timing(result.history) == without_timing(straight.history)
    assert without_timing([result.best]) == without_timing([straight.best])
    # the diagnostics continue too: the never-flipped state came back from the checkpoint
    resumed = (run_dir / "diagnostics.jsonl").read_text()
    assert resumed == (straight_dir / "diagnostics.jsonl").read_text()


def test_diagnostics_are_written_after_conversion_and_every_epoch(straight_run):
    recipe, run_dir, result = straight_run
    lines = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    layers = [name for name, m in result.model.named_modules() if isinstance(m, ReCUConv2d)]
    assert [(r["epoch"], r["layer"]) for r in lines] == [(e, name) for e in (0, 1, 2) for name in layers]
    keys = ("clipped", "clipped_nominal", "flip_rate", "changed_from_start", "never_flipped", "saturation")
    keys += ("quant_error", "entropy", "weight_shape")
    assert all(set(r) == {"epoch", "layer", *keys} for r in lines)
    first, last = lines[0], lines[-1]
    assert first["flip_rate"] is None and first["changed_from_start"] == 0 and first["never_flipped"] == 1
    assert 0 <= last["flip_rate"] <= 1 and last["never_flipped"] <= 1 - last["changed_from_start"] + 1e-12
    taus = [r["tau"] for r in read_metrics(run_dir)]
    assert [r["clipped_nominal"] for r in lines[:: len(layers)]] == pytest.approx([2 * (1 - t) for t in taus])
    assert all(0 <= r["saturation"] <= 1 for r in lines)  # measured on validation batches
    state = ckpt.load_state(run_dir)
    assert sorted(state["sign_tracker"]["layers"]) == sorted(layers)


def test_ctrl_c_while_checkpointing_waits_for_the_checkpoint(straight_run, tiny_data, tmp_path, monkeypatch):
    recipe, straight_dir, straight = straight_run
    run_dir = tmp_path / "run"
    real_save = loop.save

    def save(model, path, *, force=False, run=None):
        written = real_save(model, path, force=force, run=run)
        if path.name == "last.safetensors" and run.metrics["epoch"] == 2:
            # between last.safetensors and state.pt; raise_signal delivers to this (the main) thread at once,
            # where os.kill may hand it to another thread that a loaded machine schedules only later
            signal.raise_signal(signal.SIGINT)
        return written

    monkeypatch.setattr(loop, "save", save)
    # Ctrl-C is held back only under Python's own SIGINT handler: start from it whatever ran before
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(TrainingInterrupted):
        binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert file_metrics(run_dir / "last.safetensors")["epoch"] == ckpt.load_state(run_dir)["epoch"] == 2
    monkeypatch.undo()
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter())
    assert without_timing(result.history) == without_timing(straight.history)
    assert_same_tensors(result.model.state_dict(), straight.model.state_dict())


def test_one_epoch_then_resume_with_two_is_bit_identical(straight_run, tiny_recipe, tiny_data, tmp_path):
    _, straight_dir, straight = straight_run
    run_dir = tmp_path / "run"
    first = binarize.finetune(
        None, tiny_recipe("epochs=1"), data_dir=tiny_data, output_dir=run_dir, reporter=Reporter()
    )
    assert [r["epoch"] for r in first.history] == [0, 1]
    result = binarize.finetune(
        None, tiny_recipe("epochs=2"), data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter()
    )
    assert_same_tensors(load_file(run_dir / "last.safetensors"), load_file(straight_dir / "last.safetensors"))
    assert_same_tensors(result.model.state_dict(), straight.model.state_dict())
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(straight_dir))
    # the recipe beside the run is the one now in force, and resuming a finished run trains nothing more
    assert binarize.load_recipe(run_dir / "recipe.yaml") == tiny_recipe("epochs=2")
    again = binarize.finetune(
        None, tiny_recipe("epochs=2"), data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter()
    )
    assert without_timing(again.history) == without_timing(straight.history)
    assert_same_tensors(again.model.state_dict(), straight.model.state_dict())


def test_resume_refuses_a_different_recipe(straight_run, tiny_recipe, tiny_data, tmp_path):
    _, straight_dir, _ = straight_run
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir, run_dir)
    with pytest.raises(TrainingError, match="'stages' differs"):
        binarize.finetune(None, tiny_recipe("stages.0.optimizer.lr=0.1"), data_dir=tiny_data, output_dir=run_dir,
                          resume=True, reporter=Reporter())  # fmt: skip
    with pytest.raises(TrainingError, match="'policy' differs"):
        binarize.finetune(None, tiny_recipe("policy.shortcuts=none"), data_dir=tiny_data, output_dir=run_dir,
                          resume=True, reporter=Reporter())  # fmt: skip
    with pytest.raises(TrainingError, match="already trained 2 epochs"):
        binarize.finetune(None, tiny_recipe("epochs=1"), data_dir=tiny_data, output_dir=run_dir, resume=True,
                          reporter=Reporter())  # fmt: skip


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, two_stage_recipe_file, tiny_data):
    """The two-stage recipe straight through; the stage-1 checkpoint is copied when stage 2 starts, and the
    binarize_weights flags of the student are recorded at every epoch."""
    recipe = binarize.load_recipe(two_stage_recipe_file)
    base = tmp_path_factory.mktemp("two-stage")
    run_dir = base / "run"
    flags: list[tuple[str, list[bool], list[bool]]] = []
    real_train_epoch = loop.train_epoch

    def train_epoch(context, epoch, global_step):
        convs = [m for m in context.student.modules() if isinstance(m, ReCUConv2d)]
        flags.append((context.stage.name, [m.binarize_weights for m in convs], [m.alpha.requires_grad for m in convs]))
        return real_train_epoch(context, epoch, global_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_epoch", train_epoch)
        result = binarize.finetune(
            None,
            recipe,
            data_dir=tiny_data,
            output_dir=run_dir,
            reporter=FileCopier(run_dir, "binary-weights", 1, base / "after-stage-1"),
        )
    return recipe, run_dir, base / "after-stage-1", result, flags


def test_stages_switch_weight_binarization(two_stage_run, tiny_data):
    recipe, run_dir, stage_one, result, flags = two_stage_run
    assert flags == [("float-weights", [False, False], [False, False]), ("binary-weights", [True, True], [True, True])]
    assert [(r["epoch"], r["stage"]) for r in read_metrics(run_dir)] == [
        (0, "converted"),
        (1, "float-weights"),
        (2, "binary-weights"),
    ]
    # each stage's checkpoint loads with its flag, and reproduces its logged metrics
    for path, flag, epoch in ((stage_one / "last.safetensors", False, 1), (run_dir / "last.safetensors", True, 2)):
        model = binarize.load(path)
        convs = [m for m in model.modules() if isinstance(m, ReCUConv2d)]
        assert len(convs) == 2 and all(m.binarize_weights is flag for m in convs)
        assert read_metadata(path)["conversion"]["layer"]["binarize_weights"] is flag
        record = file_metrics(path)
        assert record["epoch"] == epoch
        metrics = binarize.evaluate(model, val_loader(path, tiny_data), torch.device("cpu"))
        assert metrics["top1"] == record["val_top1"]
        assert metrics["loss"] == pytest.approx(record["val_loss"], rel=1e-6)
    # stage 2 re-initialises the scales from the stage-1 weights and trains them
    first, final = load_file(stage_one / "last.safetensors"), load_file(run_dir / "last.safetensors")
    assert not torch.equal(first["conv1.alpha"], final["conv1.alpha"])


def test_two_stage_resume_at_the_stage_boundary_is_bit_identical(two_stage_run, tiny_data, tmp_path):
    recipe, straight_dir, _, straight, _ = two_stage_run
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        binarize.finetune(
            None,
            recipe,
            data_dir=tiny_data,
            output_dir=run_dir,
            reporter=FileCopier(run_dir, "binary-weights", 1, tmp_path / "copy", interrupt=True),
        )
    state = ckpt.load_state(run_dir)
    assert (state["stage"], state["epoch"]) == (0, 1)
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter())
    assert_same_tensors(load_file(run_dir / "last.safetensors"), load_file(straight_dir / "last.safetensors"))
    assert_same_tensors(result.model.state_dict(), straight.model.state_dict())
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(straight_dir))


# --------------------------------------------------------------------------- distillation


def test_distribution_loss_by_hand():
    student = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    teacher = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 1.0, 4.0]])
    for temperature in (1.0, 2.0):
        total = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
            t_exp = [math.exp(v / temperature) for v in t_row]
            s_norm = math.log(sum(math.exp(v / temperature) for v in s_row))
            total -= sum(e / sum(t_exp) * (s / temperature - s_norm) for e, s in zip(t_exp, s_row, strict=True))
        expected = total / 2 * temperature**2
        assert distribution_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
    labels = torch.tensor([2, 1])
    mixed = training_loss(student, labels, teacher, DistillConfig(alpha=0.25, temperature=2.0), label_smoothing=0.1)
    by_hand = 0.25 * distribution_loss(student, teacher, 2.0) + 0.75 * F.cross_entropy(
        student, labels, label_smoothing=0.1
    )
    torch.testing.assert_close(mixed, by_hand)
    assert training_loss(student, labels, None, DistillConfig()).item() == pytest.approx(
        F.cross_entropy(student, labels).item()
    )
    # a teacher equal to the student: the loss is the student's entropy, minimal over teachers
    assert distribution_loss(student, student) < distribution_loss(student, teacher)


def test_distill_teacher_none_uses_labels_only(tiny_recipe, tiny_data, monkeypatch):
    spy = Spy(monkeypatch)
    teachers = []
    real_teacher = Teachers.get

    def teacher(self, distill):
        teachers.append(real_teacher(self, distill))
        return teachers[-1]

    monkeypatch.setattr(Teachers, "get", teacher)
    recipe = tiny_recipe("epochs=1", "train.limit_train=16", "distill.teacher=none")
    binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    assert teachers == [None] and len(spy.steps) == 2
    for step in spy.steps:
        assert step["teacher_logits"] is None
        assert torch.equal(step["loss"], F.cross_entropy(step["logits"], step["labels"]))


def test_distill_from_a_teacher_given_by_spec(tiny_recipe, tiny_data, tiny_models, tmp_path, monkeypatch):
    spec = f"{tiny_models}:make_teacher"
    teacher = binarize.create_model(spec, num_classes=3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p))
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    spy = Spy(monkeypatch)
    recipe = tiny_recipe(
        "epochs=1",
        "train.limit_train=16",
        f"distill.teacher={json.dumps(spec)}",
        f"distill.teacher_weights={json.dumps(str(weights))}",
        "distill.alpha=1.0",
    )
    binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    assert len(spy.steps) == 2
    with torch.no_grad():
        for step in spy.steps:
            torch.testing.assert_close(step["teacher_logits"], teacher(step["images"]), rtol=0, atol=1e-6)
            torch.testing.assert_close(step["loss"], distribution_loss(step["logits"], step["teacher_logits"]))


# --------------------------------------------------------------------------- parameter groups


def test_parameter_groups_by_role_not_by_name(tiny_models):
    float_model = binarize.create_model(f"{tiny_models}:make_named", num_classes=3)
    model = binarize.convert(float_model, binarize.Policy(), (torch.zeros(1, 3, 16, 16),))
    assert isinstance(model.body, ReCUConv2d)
    assert type(model.conv) is nn.Conv2d  # "conv" is the stem, kept float
    roles = parameter_roles(model)
    named = {id(p): name for name, p in model.named_parameters()}
    got = {role: sorted(named[id(p)] for p in params) for role, params in roles.items()}
    assert got == {
        "binary": ["body.weight"],
        "scale": ["body.alpha"],
        "norm_bias": sorted(
            ["body.bias"] + [f"{bn}.{p}" for bn in ("bn", "body_bn", "fc_bn") for p in ("weight", "bias")] + ["fc.bias"]
        ),
        "float": ["conv.weight", "fc.weight"],
    }
    assert sum(len(v) for v in got.values()) == len(list(model.parameters()))
    decay = WeightDecayConfig(binary=1e-4, scale=2e-4, norm_bias=3e-4, float=4e-4)
    for name in ("sgd", "adam", "adamw"):
        optimizer = build_optimizer(model, OptimizerConfig(name=name, lr=0.01, weight_decay=decay))
        assert [g["role"] for g in optimizer.param_groups] == list(ROLES)
        for group in optimizer.param_groups:
            assert group["weight_decay"] == getattr(decay, group["role"])
            assert [id(p) for p in group["params"]] == [id(p) for p in roles[group["role"]]]
    # float weights (stage 1 of two-stage training): the scale is unused and frozen, in no group
    loop.set_weight_binarization(model, False)
    assert not model.body.alpha.requires_grad and not parameter_roles(model)["scale"]
    loop.set_weight_binarization(model, True)
    assert model.body.alpha.requires_grad and parameter_roles(model)["scale"] == [model.body.alpha]


# --------------------------------------------------------------------------- failures


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_loss = engine_step.training_loss
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return value * float("nan") if len(calls) >= 8 else value  # NaN from step 2 of epoch 2 on

    monkeypatch.setattr(engine_step, "training_loss", loss)
    with pytest.raises(TrainingError, match="non-finite in epoch 2") as err:
        binarize.finetune(None, tiny_recipe(), data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    assert "\n" not in str(err.value)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]
    for name in ("last.safetensors", "best.safetensors"):
        model = binarize.load(run_dir / name)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert file_metrics(run_dir / "last.safetensors")["epoch"] == 1
    assert ckpt.load_state(run_dir)["epoch"] == 1


def test_a_model_broken_by_the_last_step_of_an_epoch_is_not_checkpointed(tiny_recipe, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # one step per epoch: its loss is finite, the weights it leaves are not
    recipe = tiny_recipe("optimizer.lr=1e30", "schedule.warmup_epochs=0", "train.limit_train=8")
    with pytest.raises(TrainingError, match="validation loss became non-finite in epoch 1 .*last good checkpoint"):
        binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]
    assert file_metrics(run_dir / "last.safetensors")["epoch"] == 0 and ckpt.load_state(run_dir)["epoch"] == 0
    model = binarize.load(run_dir / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_a_failure_before_the_first_checkpoint_does_not_block_a_new_run(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def broken(*args, **kwargs):
        raise binarize.BinarizeError("broken data")

    monkeypatch.setattr(loop, "recalibrate_bn", broken)
    with pytest.raises(binarize.BinarizeError, match="broken data"):
        binarize.finetune(None, tiny_recipe("epochs=1"), data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    assert not (run_dir / "recipe.yaml").exists() and not (run_dir / "state.pt").exists()
    monkeypatch.undo()
    recipe = tiny_recipe("epochs=1", "train.limit_train=16")
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    assert [r["epoch"] for r in result.history] == [0, 1]


# --------------------------------------------------------------------------- precision and compilation


def test_bf16_channels_last_run_on_the_cpu(tiny_recipe, tiny_data, tmp_path):
    recipe = tiny_recipe("epochs=1", "train.precision=bf16", "train.channels_last=true")
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=tmp_path / "run", reporter=Reporter())
    assert [r["epoch"] for r in result.history] == [0, 1]
    for r in result.history:
        assert all(math.isfinite(r[k]) for k in ("val_loss", "val_top1", "val_top5"))
    assert math.isfinite(result.history[1]["train_loss"])
    assert loop.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    model = binarize.load(tmp_path / "run" / "last.safetensors")
    assert all(t.dtype in (torch.float32, torch.int64) for t in model.state_dict().values())


@slow
def test_compiled_run_on_the_cpu(tiny_recipe, tiny_data):
    recipe = tiny_recipe("epochs=1", "train.compile=true", "train.limit_train=16")
    result = binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    assert [r["epoch"] for r in result.history] == [0, 1]
    assert all(math.isfinite(r["val_loss"]) for r in result.history)
    assert math.isfinite(result.history[1]["train_loss"])


# --------------------------------------------------------------------------- the demo and real data


def test_run_demo_fine_tuning_improves_on_the_converted_model():
    from binarize.demo import run_demo

    result = run_demo(float_epochs=2, binary_epochs=2)
    assert result.binary_convs == 3
    assert 0 < result.packed_bytes < result.fp32_bytes / 4
    assert result.float_top1 > 80
    assert result.converted_top1 < result.float_top1
    assert result.finetuned_top1 > result.converted_top1 + 10
    assert result.packed_top1 == result.finetuned_top1  # the packed file, loaded back, predicts the same
    assert result.float_ms > 0 and result.packed_ms > 0 and result.kernel in binarize.nn.kernel_info()["available"]
    assert result.seconds > 0


def test_run_demo_is_fixed_by_its_seed():
    """Every figure of the demo depends on its seed only, not on the global random state before it."""
    from binarize.demo import run_demo

    results = []
    for state in (1, 2):
        torch.manual_seed(state)
        r = run_demo(seed=3, float_epochs=1, binary_epochs=1)
        results.append((r.float_top1, r.converted_top1, r.finetuned_top1))
    assert results[0] == results[1]
    torch.manual_seed(1)
    other = run_demo(seed=4, float_epochs=1, binary_epochs=1)
    assert (other.float_top1, other.converted_top1, other.finetuned_top1) != results[0]


@slow
@pytest.mark.skipif(not (SHARED / "models" / "cifar10-resnet20-12fca82f.th").is_file(), reason="no shared models")
def test_posthoc_recipe_on_real_cifar10(tmp_path_factory, tmp_path):
    """The shipped post-hoc recipe on the pretrained ResNet-20 and 600 real CIFAR-10 images."""
    root = extract_cifar10(tmp_path_factory.mktemp("cifar10"), per_class=60)
    float_model = binarize.create_model("cifar_resnet20", weights=SHARED / "models" / "cifar10-resnet20-12fca82f.th")
    recipe = binarize.load_recipe(
        "cifar10-resnet20-posthoc",
        ["epochs=2", "batch_size=32", "data.workers=0", "train.device=cpu", "train.bn_calibration_batches=8"],
    )
    result = binarize.finetune(float_model, recipe, data_dir=root, output_dir=tmp_path / "run", reporter=Reporter())
    converted, last = result.history[0], result.history[-1]
    assert last["val_images"] == 600
    assert last["val_top1"] > converted["val_top1"]
    model = binarize.load(tmp_path / "run" / "best.safetensors")
    metrics = binarize.evaluate(model, val_loader(tmp_path / "run" / "best.safetensors", root, 32), torch.device("cpu"))
    assert metrics["top1"] == result.best["val_top1"]
