"""Tests of the post-hoc recovery options: block-wise feature distillation, teacher-forced block reconstruction,
activation thresholds initialised from data, and the BatchNorm refresh after each epoch.

Each option: its validation errors, its formula against an independent float64 reference, and a tiny
end-to-end run (the tiny CNN and recipe of ``conftest.py``).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

import binarize
from binarize.conversion.calibration import calibrate_thresholds, relu_thresholds
from binarize.engine import loop, step
from binarize.engine.feature_distill import (
    FeatureDistiller,
    StageDistillation,
    attention_map,
    feature_loss,
    resolve_layers,
)
from binarize.engine.progress import Reporter
from binarize.engine.schedules import lr_at
from binarize.errors import ConfigError
from binarize.nn import ReCUConv2d
from binarize.recipes import (
    BlockReconstructionConfig,
    DistillConfig,
    FeatureDistillConfig,
    StageConfig,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pair(tiny_models, **layer):
    teacher = binarize.create_model(f"{tiny_models}:make_net", num_classes=3).eval()
    options = binarize.LayerOptions(**layer)
    student = binarize.convert(teacher, binarize.Policy(), (torch.zeros(1, 3, 16, 16),), layer=options)
    return student, teacher


# --------------------------------------------------------------------------- feature distillation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -1.0, "layers": ("act1",)}, r"weight: must be >= 0"),
        ({"weight": 1.0}, r"layers: name the modules to match"),
        ({"weight": 1.0, "layers": ("",)}, r"layers: non-empty patterns"),
        ({"loss": "l1"}, r"loss: must be one of 'mse', 'attention', got 'l1'"),
    ],
)
def test_feature_distill_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FeatureDistillConfig.from_dict(kwargs) if "loss" in kwargs else FeatureDistillConfig(**kwargs)


def test_feature_distill_needs_a_teacher(tiny_recipe):
    with pytest.raises(ConfigError, match=r"feature_distill: needs a teacher"):
        StageConfig(feature_distill=FeatureDistillConfig(weight=1.0, layers=("act1",)), distill=DistillConfig("none"))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.feature_distill: needs a teacher"):
        tiny_recipe("distill.teacher=none", "feature_distill.weight=1.0", "feature_distill.layers=[act1]")


def test_feature_losses_against_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    sd, td = s.double().numpy(), t.double().numpy()
    mse = ((sd - td) ** 2).mean() / (td**2).mean()
    assert feature_loss(s, t, "mse").item() == pytest.approx(mse, rel=1e-5)
    q = lambda a: (a**2).sum(axis=1).reshape(a.shape[0], -1)  # noqa: E731 - Q = sum_c |A_c|^2
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    attention = np.linalg.norm(unit(q(sd)) - unit(q(td)), axis=1).mean()
    assert feature_loss(s, t, "attention").item() == pytest.approx(attention, rel=1e-5)
    assert attention_map(t).norm(dim=1) == pytest.approx(torch.ones(3))
    # identical features: no loss; the teacher side is a constant
    assert feature_loss(t, t, "mse").item() == 0.0
    s.requires_grad_(True)
    t.requires_grad_(True)
    feature_loss(s, t, "mse").backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ConfigError, match=r"has shape \(3, 4, 5, 6\) but the teacher's has \(3, 4, 5, 5\)"):
        feature_loss(s, t[..., :5], "mse")


def test_layer_patterns_resolve_in_both_models(tiny_models):
    student, teacher = tiny_pair(tiny_models)
    assert "act1_sign_input" in dict(student.named_modules())  # added by the conversion: not in the teacher
    assert resolve_layers(student, teacher, ["act*", "bn2", "bn*"]) == ["act2", "bn2", "bn0", "bn1"]
    for pattern in ("layer*", "act1_sign_input"):
        with pytest.raises(ConfigError, match=rf"'{re.escape(pattern)}' matches no module of both the student and"):
            resolve_layers(student, teacher, [pattern])


def test_distiller_records_only_in_a_training_step_and_computes_the_mean_loss(tiny_models):
    student, teacher = tiny_pair(tiny_models)
    x = torch.randn(4, 3, 16, 16)
    distiller = FeatureDistiller(student, teacher, ["bn1", "act2"], "mse")
    student(x), teacher(x)  # outside record(): nothing kept (evaluation)
    assert distiller.outputs == {"student": {}, "teacher": {}}
    with distiller.record():
        student(x)
        with torch.no_grad():
            teacher(x)
    loss = distiller.loss()
    expected = []
    for name in ("bn1", "act2"):
        s = dict(student.named_modules())[name]
        t = dict(teacher.named_modules())[name]
        outs = {}
        pairs = (("s", s), ("t", t))
        hs = [m.register_forward_hook(lambda m, a, o, k=k, d=outs: d.__setitem__(k, o)) for k, m in pairs]
        student(x), teacher(x)
        for h in hs:
            h.remove()
        expected.append(((outs["s"] - outs["t"]) ** 2).mean() / (outs["t"] ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert loss.requires_grad and distiller.outputs == {"student": {}, "teacher": {}}
    # a step where the teacher did not run is an error, not a silent zero
    with distiller.record():
        student(x)
    with pytest.raises(ConfigError, match=r"'bn1' ran 1 time\(s\) in the student and 0 in the teacher"):
        distiller.loss()
    distiller.remove()
    with distiller.record():
        student(x), teacher(x)
    assert distiller.outputs == {"student": {}, "teacher": {}}


def test_feature_distillation_run_adds_the_feature_loss(tiny_recipe, tiny_data, monkeypatch):
    seen = []
    real = FeatureDistiller.loss

    def spy(self):
        value = real(self)
        seen.append(value.detach())
        return value

    monkeypatch.setattr(FeatureDistiller, "loss", spy)
    recipe = tiny_recipe("feature_distill.weight=2.0", "feature_distill.layers=[bn1, act2]", "epochs=1")
    with_features = binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    steps = 48 // 8
    assert len(seen) == steps and all(torch.isfinite(v) and v > 0 for v in seen)
    plain = binarize.finetune(None, tiny_recipe("epochs=1"), data_dir=tiny_data, reporter=Reporter())
    # the first step's loss differs by exactly weight * feature loss (same data, same start)
    assert with_features.history[1]["train_loss"] != plain.history[1]["train_loss"]
    # no hooks are left behind on the returned model
    assert all(not m._forward_hooks for m in with_features.model.modules())


# --------------------------------------------------------------------------- activation thresholds


def brute_force_threshold(values: np.ndarray) -> float:
    """The cut between sorted distinct values maximising corr(relu(x), 1[x > t]), in float64."""
    relu = np.maximum(values, 0.0)
    distinct = np.unique(values)
    best, best_t = -np.inf, 0.0
    for lo, hi in itertools.pairwise(distinct):
        t = (lo + hi) / 2
        s = (values > t).astype(np.float64)
        corr = np.corrcoef(relu, s)[0, 1] if relu.std() > 0 else -np.inf
        if corr > best:
            best, best_t = corr, t
    return best_t


def test_relu_thresholds_against_a_brute_force_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=gen)
    x[1] = x[1] * 0.5 - 1.0
    x[2] = x[2] * 2.0 + 1.0
    x[3] = torch.round(x[3] * 2) / 2  # ties
    got = relu_thresholds(x)
    for row, t in zip(x.double().numpy(), got.tolist(), strict=True):
        assert t == pytest.approx(brute_force_threshold(row), abs=1e-6)
    # a standard normal: the cut sits about 0.71 above the mean (the indicator best standing for a ReLU)
    big = torch.randn(1, 200_000, generator=gen)
    assert relu_thresholds(big).item() == pytest.approx(0.71, abs=0.03)
    assert relu_thresholds(torch.ones(2, 10)).tolist() == [0.0, 0.0]


def test_calibrate_thresholds_sets_the_activation_bias(tiny_models):
    student, _ = tiny_pair(tiny_models, activation_bias=True)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    inputs = {}
    layers = {n: m for n, m in student.named_modules() if isinstance(m, ReCUConv2d)}
    hs = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0])) for n, m in layers.items()
    ]
    student.eval()
    with torch.no_grad():
        for b in batches[:2]:
            student(b)
    for h in hs:
        h.remove()
    student.train()
    found = calibrate_thresholds(student, batches, max_batches=2)
    assert set(found) == set(layers) and student.training
    for name, layer in layers.items():
        x = torch.cat(inputs[name]).transpose(0, 1).flatten(1)
        assert torch.equal(layer.activation_bias.detach(), -relu_thresholds(x))
    assert calibrate_thresholds(tiny_pair(tiny_models)[0], batches) == {}


def test_calibrated_thresholds_in_a_run(tiny_recipe, tiny_data, monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.calibrate_thresholds: .* set layer\.activation_bias: true"):
        tiny_recipe("train.calibrate_thresholds=true")
    calls = []
    real = loop.calibrate_thresholds
    monkeypatch.setattr(loop, "calibrate_thresholds", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    recipe = tiny_recipe("layer.activation_bias=true", "train.calibrate_thresholds=true", "epochs=1")
    result = binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    (found,) = calls
    assert len(found) == 2 and all((t != 0).any() for t in found.values())
    assert result.history[1]["val_top1"] >= 0


# --------------------------------------------------------------------------- block reconstruction (teacher forcing)


def test_teacher_forced_blocks_get_the_teachers_inputs_and_learn_locally():
    teacher = binarize.create_model("cifar_resnet20", num_classes=10).eval()
    student = binarize.convert(teacher, binarize.Policy(), (torch.zeros(1, 3, 32, 32),))
    student.train()
    distiller = FeatureDistiller(student, teacher, ["layer*.*.relu2"], "mse", teacher_forced=True)
    x = torch.randn(4, 3, 32, 32)
    taught = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: taught.__setitem__(n, a[0]))
        for n, m in teacher.named_modules()
        if n.endswith("relu2")
    ]
    with distiller.record():
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
    for h in hooks:
        h.remove()
    # the head sees the teacher's last block output: the logits are the teacher's
    assert torch.allclose(logits, teacher_logits, atol=1e-5)
    got = distiller.outputs["student"]
    assert list(got) == distiller.names and len(distiller.names) == 9
    expected = torch.stack([feature_loss(got[n][0], taught[n], "mse") for n in distiller.names]).mean()
    single = feature_loss(got["layer2.1.relu2"][0], taught["layer2.1.relu2"], "mse")
    loss = distiller.loss()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # a block's loss reaches only that block's convs: no gradient crosses a boundary
    single.backward()
    reached = sorted(n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    assert [n for n in reached if n.endswith("conv1.weight") or n.endswith("conv2.weight")] == [
        "layer2.1.conv1.weight",
        "layer2.1.conv2.weight",
    ]
    # outside a training step (evaluation) nothing is substituted
    with torch.no_grad():
        assert not torch.allclose(student.eval()(x), teacher(x), atol=1e-3)
    with pytest.raises(ConfigError, match=r"the teacher must run before the student"):
        with distiller.record():
            student(x)
    distiller.remove()


def test_block_reconstruction_config_errors(tiny_recipe):
    for kwargs, message in (
        ({"fraction": 1.0, "layers": ("act2",)}, r"fraction: must lie in \[0, 1\)"),
        ({"fraction": 0.5}, r"layers: name the block boundaries"),
    ):
        with pytest.raises(ConfigError, match=message):
            BlockReconstructionConfig(**kwargs)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.block_reconstruction: needs a teacher"):
        tiny_recipe("distill.teacher=none", "block_reconstruction.fraction=0.5", "block_reconstruction.layers=[act2]")


def test_block_reconstruction_phase_in_a_run(tiny_recipe, tiny_data, monkeypatch):
    steps = []  # (kind, lr) per step
    real_loss, real_blocks = step.training_loss, FeatureDistiller.loss

    def logit_loss(*a, **k):
        steps.append("end-to-end")
        return real_loss(*a, **k)

    def block_loss(self):
        steps.append("blocks")
        return real_blocks(self)

    monkeypatch.setattr(step, "training_loss", logit_loss)
    monkeypatch.setattr(FeatureDistiller, "loss", block_loss)
    optimizers = []
    real_build = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a: optimizers.append(real_build(*a)) or optimizers[-1])
    recipe = tiny_recipe(
        "block_reconstruction.fraction=0.3", "block_reconstruction.layers=[act2]", "schedule.name=cosine"
    )  # 2 epochs of 6 steps: 4 block steps (round(0.3 * 12)), then 8 end to end
    objectives = []
    real_init = StageDistillation.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        objectives.append(self)

    monkeypatch.setattr(StageDistillation, "__init__", init)
    result = binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    assert steps == ["blocks"] * 4 + ["end-to-end"] * 8
    (obj,) = objectives
    stage = recipe.stages[0]
    # each phase runs the stage's schedule over its own steps: warm-up (3 steps) and cosine, twice
    lrs = [obj.lr(i, 6, stage) for i in range(12)]
    first = [lr_at(i, 6, 4 / 6, stage.optimizer.lr, stage.schedule) for i in range(4)]
    second = [lr_at(i, 6, 8 / 6, stage.optimizer.lr, stage.schedule) for i in range(8)]
    assert lrs == pytest.approx(first + second)
    assert lrs[4] == pytest.approx(stage.optimizer.lr / 3)  # warm-up again after the switch
    assert result.history[-1]["lr"] == pytest.approx(lrs[-1])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in result.model.modules())
    # Adam's moments were reset at the switch: its step count is that of the end-to-end phase
    (optimizer,) = optimizers
    assert {int(state["step"]) for state in optimizer.state.values()} == {8}


# --------------------------------------------------------------------------- BatchNorm refresh


def test_bn_refresh_after_each_epoch(tiny_recipe, tiny_data, monkeypatch):
    with pytest.raises(ConfigError, match=r"bn_refresh_batches: must be >= 0"):
        tiny_recipe("train.bn_refresh_batches=-1")
    calls = []
    real = loop.recalibrate_bn

    def spy(model, batches, max_batches=None):
        calls.append(max_batches)
        return real(model, batches, max_batches)

    monkeypatch.setattr(loop, "recalibrate_bn", spy)
    result = binarize.finetune(None, tiny_recipe("train.bn_refresh_batches=3"), data_dir=tiny_data, reporter=Reporter())
    assert calls == [2, 3, 3]  # the calibration after conversion, then one refresh per epoch
    bn = next(m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 3  # reset and re-averaged over exactly 3 batches


# --------------------------------------------------------------------------- resume


def test_resume_with_every_recovery_option_is_bit_identical(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    """3 epochs of 6 steps; block reconstruction for round(0.4 * 18) = 7 steps, so the switch to end-to-end
    training (and the optimizer reset) falls inside epoch 2, which the interrupted run redoes on resume."""
    from safetensors.torch import load_file

    recipe = tiny_recipe(
        "epochs=3",
        "block_reconstruction.fraction=0.4",
        "block_reconstruction.layers=[act2]",
        "feature_distill.weight=0.5",
        "feature_distill.layers=[bn1]",
        "layer.activation_bias=true",
        "train.calibrate_thresholds=true",
        "train.bn_refresh_batches=2",
    )
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    straight = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=straight_dir, reporter=Reporter())
    calls = []
    real = step.training_loss

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third end-to-end step: step 9, in epoch 2 after the switch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(step, "training_loss", interrupt)
        with pytest.raises(binarize.errors.TrainingInterrupted):
            binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, reporter=Reporter())
    resumed = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=run_dir, resume=True, reporter=Reporter())
    final, expected = load_file(run_dir / "last.safetensors"), load_file(straight_dir / "last.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    strip = lambda history: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert (run_dir / "diagnostics.jsonl").read_text() == (straight_dir / "diagnostics.jsonl").read_text()


def test_block_reconstruction_without_logit_distillation_still_gets_its_teacher(tiny_recipe, tiny_data, monkeypatch):
    calls = []
    real = FeatureDistiller.loss
    monkeypatch.setattr(FeatureDistiller, "loss", lambda self: calls.append(1) or real(self))
    recipe = tiny_recipe(
        "epochs=1", "distill.alpha=0", "block_reconstruction.fraction=0.5", "block_reconstruction.layers=[act2]"
    )
    assert not recipe.stages[0].distill.enabled
    binarize.finetune(None, recipe, data_dir=tiny_data, reporter=Reporter())
    assert len(calls) == 3  # half of the 6 steps reconstruct blocks from the float teacher
