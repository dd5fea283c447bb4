"""The fine-tuning engine: a float model and a recipe in, a trained binary model out.

``finetune`` = resolve the recipe -> build the float model (the default teacher) -> data -> convert
-> (fresh run) re-estimate BatchNorm statistics and evaluate "epoch 0" -> for each stage and epoch:
set tau, train, evaluate, record, checkpoint. A training step never reads a value back to the host;
the loss is read every ``log_every`` steps for the progress bar and the non-finite check.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from binarize._utils import mix_seed, unwrap
from binarize.conversion.pipeline import convert, recalibrate_bn
from binarize.conversion.record import binarize_meta, set_record
from binarize.data import Datasets, ResolvedData, build_datasets, build_loaders, resolve_data_config
from binarize.engine import checkpoint as ckpt
from binarize.engine.distributed import DistContext, all_reduce_sum, broadcast_buffers
from binarize.engine.losses import top_k_correct, training_loss
from binarize.engine.optim import build_optimizer
from binarize.engine.progress import Reporter, RichReporter
from binarize.engine.records import CURVES, MetricsLog, plot_curves
from binarize.engine.schedules import lr_at, tau_at
from binarize.errors import ConfigError, DataError, TrainingError, TrainingInterrupted
from binarize.files import RunRecord, save
from binarize.models import create_model
from binarize.nn import ReCUConv2d
from binarize.recipes import Recipe, StageConfig, dump_recipe, load_recipe
from binarize.weights import load_weights

__all__ = ["FinetuneResult", "finetune", "evaluate", "set_tau", "set_weight_binarization", "autocast_dtype"]

RECIPE_FILE = "recipe.yaml"


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: The binary model after the last epoch (in eval mode).
        best: The metrics of the epoch with the best validation top-1.
        history: One metrics dict per epoch, epoch 0 being the converted model before training.
        output_dir: The run directory, or None for a run without files.
    """

    model: nn.Module
    best: dict[str, Any]
    history: list[dict[str, Any]]
    output_dir: Path | None


def set_tau(model: nn.Module, tau: float) -> None:
    """Sets tau of every ReCU layer in place (no reallocation, no host sync)."""
    for module in model.modules():
        if isinstance(module, ReCUConv2d):
            module.tau.fill_(tau)


def set_weight_binarization(model: nn.Module, enabled: bool) -> None:
    """Switches every ReCU layer between binary and float weights (activations stay binary).

    Turning weight binarization on re-initialises each layer's scale from its current weights, as
    the second stage of two-stage training starts from the first stage's float weights. With float
    weights the scale is unused, so it is frozen (DistributedDataParallel rejects parameters that
    get no gradient).
    """
    for module in model.modules():
        if isinstance(module, ReCUConv2d):
            if module.binarize_weights != enabled:
                module.binarize_weights = enabled
                if enabled:
                    module.reset_alpha()
            module.alpha.requires_grad_(enabled)
    record = binarize_meta(model)
    if record is not None:
        set_record(model, dataclasses.replace(record, layer=record.layer.replace(binarize_weights=enabled)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: full precision)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy and image count over a loader (summed over processes)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = top_k_correct(logits, labels)
        sums[0] += loss.double()
        sums[1] += top1
        sums[2] += top5
        sums[3] += labels.shape[0]
    all_reduce_sum(sums, ctx or DistContext())
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count, "images": int(count)}


def _to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@dataclasses.dataclass
class _Run:
    """Everything an epoch needs, built once per run."""

    recipe: Recipe
    ctx: DistContext
    device: torch.device
    dtype: torch.dtype | None
    datasets: Datasets
    resolved: ResolvedData
    float_model: nn.Module
    student: nn.Module
    run_dir: Path | None
    reporter: Reporter
    log: MetricsLog
    best: dict[str, Any]
    teachers: dict[str, nn.Module] = dataclasses.field(default_factory=dict)

    @property
    def writes(self) -> bool:
        return self.run_dir is not None and self.ctx.is_main


def _float_model(model: nn.Module | str | None, recipe: Recipe) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    spec = model or recipe.model.spec
    if not spec:
        raise ConfigError("model: no model given; pass --model SPEC or set model.spec in the recipe")
    return create_model(
        spec, pretrained=recipe.model.pretrained, num_classes=recipe.model.num_classes, weights=recipe.model.weights
    )


def _datasets(recipe, resolved, train_data, val_data, data_dir) -> Datasets:
    if train_data is not None or val_data is not None:
        if train_data is None or val_data is None:
            raise DataError("pass both train_data and val_data, or a data directory")
        classes = getattr(train_data, "classes", None)
        if classes is None:
            targets = getattr(train_data, "targets", None)
            if targets is None:
                raise DataError("train_data needs a 'classes' or 'targets' attribute to count the classes")
            classes = [str(c) for c in range(int(max(targets)) + 1)]
        return Datasets(train=train_data, val=val_data, classes=list(classes))
    if data_dir is None and recipe.data.dataset == "folder":
        raise DataError("no data: pass --data DIR (an image folder with train/ and val/ or test/)")
    return build_datasets(recipe.data, data_dir, resolved)


def _check_classes(model: nn.Module, num_classes: int, input_size: Sequence[int], device: torch.device) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    if out.dim() != 2 or out.shape[1] != num_classes:
        got = out.shape[1] if out.dim() == 2 else tuple(out.shape)
        raise ConfigError(
            f"the model outputs {got} classes but the dataset has {num_classes}; "
            f"pass --num-classes {num_classes} (or --set model.num_classes={num_classes})"
        )


def _prepare_run_dir(output_dir: str | Path | None, resume: bool, ctx: DistContext) -> Path | None:
    if output_dir is None:
        if resume:
            raise ConfigError("--resume needs the --output directory of the run to continue")
        return None
    run_dir = Path(output_dir)
    ours = [n for n in (ckpt.STATE, ckpt.LAST, "metrics.jsonl", RECIPE_FILE) if (run_dir / n).exists()]
    if not resume and ours:
        raise TrainingError(
            f"{run_dir} already holds a run ({', '.join(ours)}); "
            "pass --resume to continue it or choose another --output"
        )
    if resume and not (run_dir / ckpt.STATE).exists():
        raise TrainingError(f"nothing to resume in {run_dir}: no {ckpt.STATE}; start without --resume")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()  # every process has checked the directory before the main one writes into it
    return run_dir


def _check_same_recipe(run_dir: Path, recipe: Recipe, state: dict) -> None:
    """A resumed run follows the recipe it started with, except for ``train`` settings and the ``epochs``
    of the stage in progress and later stages (to train longer: the rest of their schedules follow the
    new length)."""
    import yaml

    saved = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    current = recipe.to_dict()
    done = state["stage"]
    for key in current:
        old, new = saved.get(key), current[key]
        if key == "stages" and isinstance(old, list) and len(old) == len(new):  # later stages may change length
            old = [_without_epochs(s) if i >= done else s for i, s in enumerate(old)]
            new = [_without_epochs(s) if i >= done else s for i, s in enumerate(new)]
        if key != "train" and old != new:
            raise TrainingError(
                f"the recipe's '{key}' differs from the run in {run_dir}; resume with the same recipe and options"
            )
    stage = recipe.stages[done]
    if stage.epochs < state["epoch"]:
        raise TrainingError(
            f"stage '{stage.name}' of the run in {run_dir} has already trained {state['epoch']} epochs; "
            f"resume with at least that many epochs (got {stage.epochs})"
        )


def _without_epochs(stage: Any) -> Any:
    return {k: v for k, v in stage.items() if k != "epochs"} if isinstance(stage, dict) else stage


def _write_recipe(run: _Run) -> None:
    if run.writes:
        (run.run_dir / RECIPE_FILE).write_text(dump_recipe(run.recipe))


def _teacher(run: _Run, stage: StageConfig) -> nn.Module | None:
    distill = stage.distill
    if not distill.enabled:
        return None
    key = f"{distill.teacher}|{distill.teacher_weights}|{distill.teacher_pretrained}"
    if key not in run.teachers:
        if distill.teacher == "float":
            teacher = copy.deepcopy(unwrap(run.float_model))
        else:
            teacher = create_model(
                distill.teacher,
                pretrained=distill.teacher_pretrained,
                num_classes=run.datasets.num_classes,
                weights=distill.teacher_weights,
            )
        teacher.to(run.device).eval().requires_grad_(False)
        if run.recipe.train.channels_last:
            teacher.to(memory_format=torch.channels_last)
        run.teachers[key] = teacher
    return run.teachers[key]


def _record(run: _Run, epoch: int, stage: str, tau: float, lr: float, train: dict | None, val: dict) -> dict:
    record = {
        "epoch": epoch,
        "stage": stage,
        "tau": tau,
        "lr": lr,
        "train_loss": None if train is None else train["loss"],
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "val_images": val["images"],
        "images_per_s": None if train is None else train["images_per_s"],
        "seconds": None if train is None else train["seconds"],
    }
    if run.ctx.is_main:
        run.log.append(record)
        run.reporter.end_epoch(record)
    return record


def _run_record(run: _Run, record: dict) -> RunRecord:
    return RunRecord(metrics=record, data=run.resolved, classes=tuple(run.datasets.classes))


def _checkpoint(run: _Run, record: dict, state: dict) -> None:
    """Writes last (and best) model files and the training state; only the main process writes."""
    improved = record["val_top1"] > run.best.get("val_top1", -1.0)
    if improved:
        run.best.clear()
        run.best.update(record)
    if not run.writes:
        return
    with ckpt.interrupts_deferred():  # Ctrl-C here would leave last.safetensors and state.pt at different epochs
        save(run.student, run.run_dir / ckpt.LAST, force=True, run=_run_record(run, record))
        if improved:
            save(run.student, run.run_dir / ckpt.BEST, force=True, run=_run_record(run, record))
        ckpt.save_state(run.run_dir, {**state, "best": dict(run.best), "rng": ckpt.rng_state()})


def _train_epoch(run, model, teacher, loaders, optimizer, scaler, stage, stage_index, epoch, step) -> tuple[dict, int]:
    recipe, device = run.recipe, run.device
    steps = len(loaders.train)
    method = recipe.method
    model.train()
    loss_sum = torch.zeros((), device=device)
    images_seen, start, last_log = 0, time.perf_counter(), 0
    params = [p for p in run.student.parameters() if p.requires_grad]
    run.reporter.start_epoch(epoch + 1, stage.epochs, steps, stage.name)
    for i, (images, labels) in enumerate(loaders.train):
        images, labels = _to_device(images, labels, device, recipe.train.channels_last)
        lr = lr_at(step, steps, stage.epochs, stage.optimizer.lr, stage.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if method.granularity == "step":
            set_tau(run.student, tau_at(epoch + i / steps, stage.epochs, method))
        with torch.autocast(device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            logits = model(images)
            with torch.no_grad():
                teacher_logits = teacher(images) if teacher is not None else None
            loss = training_loss(logits, labels, teacher_logits, stage.distill, stage.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if stage.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_sum += loss.detach()
        images_seen += labels.shape[0]
        if (i + 1) % recipe.train.log_every == 0 or i + 1 == steps:
            # the sum over processes, so that every process stops together on a non-finite loss
            mean = all_reduce_sum(loss_sum.clone(), run.ctx).item() / ((i + 1) * run.ctx.world_size)
            if not math.isfinite(mean):
                raise _non_finite("loss", epoch, stage, f" (step {i + 1})")
            last_log = i + 1
            run.reporter.step(last_log, mean, images_seen / max(time.perf_counter() - start, 1e-9))
    seconds = time.perf_counter() - start
    totals = torch.zeros(2, device=device)
    totals[0] += loss_sum
    totals[1] += steps
    all_reduce_sum(totals, run.ctx)
    mean_loss = (totals[0] / totals[1]).item()
    images_total = images_seen * run.ctx.world_size
    return {"loss": mean_loss, "seconds": seconds, "images_per_s": images_total / max(seconds, 1e-9)}, step


def _non_finite(what: str, epoch: int, stage: StageConfig, where: str = "") -> TrainingError:
    return TrainingError(
        f"the {what} became non-finite in epoch {epoch + 1} of stage '{stage.name}'{where}; the last good "
        "checkpoint is kept: lower the learning rate or clip gradients (--set grad_clip=1.0)"
    )


def _run_stage(run: _Run, stage_index: int, start_epoch: int, state: dict | None, epoch_offset: int) -> None:
    recipe, stage = run.recipe, run.recipe.stages[stage_index]
    set_weight_binarization(run.student, stage.binarize_weights)
    teacher = _teacher(run, stage)
    loaders = build_loaders(
        run.datasets,
        stage.batch_size,
        recipe.data,
        seed=recipe.train.seed,
        limit_train=recipe.train.limit_train,
        distributed=run.ctx.enabled,
        device_type=run.device.type,
    )
    optimizer = build_optimizer(run.student, stage.optimizer)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype is torch.float16)
    step = start_epoch * len(loaders.train)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
    model = run.student
    if run.ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device] if run.device.type == "cuda" else None
        )
    if recipe.train.compile:
        model = torch.compile(model)
    try:
        for epoch in range(start_epoch, stage.epochs):
            tau = tau_at(epoch, stage.epochs, recipe.method)
            set_tau(run.student, tau)
            loaders.set_epoch(epoch)
            torch.manual_seed(mix_seed(recipe.train.seed, stage_index, epoch))
            train, step = _train_epoch(run, model, teacher, loaders, optimizer, scaler, stage, stage_index, epoch, step)
            broadcast_buffers(run.student, run.ctx)
            val = evaluate(model, loaders.val, run.device, run.dtype, recipe.train.channels_last, run.ctx)
            if not math.isfinite(val["loss"]):  # the last step broke the model: do not checkpoint it
                raise _non_finite("validation loss", epoch, stage)
            lr = optimizer.param_groups[0]["lr"]
            record = _record(run, epoch_offset + epoch + 1, stage.name, tau, lr, train, val)
            state = {
                "stage": stage_index,
                "epoch": epoch + 1,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
            }
            _checkpoint(run, record, state)
    except KeyboardInterrupt:
        if run.writes:
            save(run.student, run.run_dir / ckpt.INTERRUPTED, force=True, run=_run_record(run, {}))
            where = f"{run.run_dir / ckpt.INTERRUPTED} (resume with --resume continues from {ckpt.LAST})"
        else:
            where = "nothing (no output directory)"
        raise TrainingInterrupted(f"interrupted in stage '{stage.name}'; saved {where}") from None
    finally:
        loaders.close()


def _resume_position(state: dict, recipe: Recipe) -> tuple[int, int]:
    stage, epoch = state["stage"], state["epoch"]
    if epoch >= recipe.stages[stage].epochs:
        return stage + 1, 0
    return stage, epoch


def finetune(
    model: nn.Module | str | None,
    recipe: Recipe | str | Path,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
    *,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    ctx: DistContext | None = None,
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """Converts a float model and trains the binary model back, following a recipe.

    Args:
        model: The float model (``nn.Module``, also the default teacher) or a model specification;
            None takes the recipe's ``model.spec``.
        recipe: A :class:`~binarize.recipes.Recipe`, a shipped recipe name or a YAML file.
        train_data: A training dataset of ``(image tensor, label)``; with ``val_data``, instead of
            ``data_dir``. It needs ``classes`` or ``targets``.
        val_data: The validation dataset.
        data_dir: The dataset directory (see :mod:`binarize.data`).
        output_dir: Run directory for checkpoints, ``metrics.jsonl``, the resolved recipe and curves;
            None writes nothing.
        resume: Continue the run in ``output_dir`` from its last checkpoint.
        ctx: This process's place in a torchrun job (:func:`binarize.engine.distributed.from_environment`).
        reporter: Progress display; a :class:`~binarize.engine.progress.RichReporter` on the main
            process by default.

    Returns:
        A :class:`FinetuneResult`.

    Example::

        >>> result = finetune(float_model, "cifar10-resnet20-posthoc", data_dir="cifar10", output_dir="runs/r20")
        >>> result.best["val_top1"]
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    ctx = ctx or DistContext()
    device = ctx.device(recipe.train.device)
    ctx.init_process_group(device)
    if reporter is None:
        reporter = RichReporter() if ctx.is_main else Reporter()
    torch.manual_seed(recipe.train.seed)
    run_dir = _prepare_run_dir(output_dir, resume, ctx)
    state = ckpt.load_state(run_dir) if resume else None
    if resume:
        _check_same_recipe(run_dir, recipe, state)
    float_model = _float_model(model, recipe)
    resolved = resolve_data_config(recipe.data, float_model)
    datasets = _datasets(recipe, resolved, train_data, val_data, data_dir)
    float_model.to(device)
    _check_classes(float_model, datasets.num_classes, resolved.input_size, device)
    example = (torch.zeros(1, *resolved.input_size, device=device),)
    student = convert(float_model, recipe.policy, example, layer=recipe.layer_options(0)).to(device)
    if recipe.train.channels_last:
        student.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(recipe.train.precision, device)
    keep_until = None if state is None else _global_epoch(recipe, state)
    log = MetricsLog(run_dir if ctx.is_main else None, keep_until=keep_until)
    run = _Run(recipe, ctx, device, dtype, datasets, resolved, float_model, student, run_dir, reporter, log, {})
    try:
        if state is None:
            _start(run)
            first_stage, first_epoch = 0, 0
        else:
            first_stage, first_epoch = _restore(run, state)
        for index in range(first_stage, len(recipe.stages)):
            offset = sum(s.epochs for s in recipe.stages[:index])
            stage_state = state if (state is not None and index == first_stage and first_epoch > 0) else None
            _run_stage(run, index, first_epoch if index == first_stage else 0, stage_state, offset)
        if run.writes:
            plot_curves(log.records, run.run_dir / CURVES)
    finally:
        log.close()
        reporter.close()
    return FinetuneResult(student.eval(), dict(run.best), list(log.records), run_dir)


def _global_epoch(recipe: Recipe, state: dict) -> int:
    return sum(s.epochs for s in recipe.stages[: state["stage"]]) + state["epoch"]


def _start(run: _Run) -> None:
    """A fresh run: re-estimate BatchNorm statistics, evaluate the converted model, write the recipe and epoch 0."""
    recipe = run.recipe
    stage = recipe.stages[0]
    loaders = build_loaders(
        run.datasets, stage.batch_size, recipe.data, seed=recipe.train.seed,
        limit_train=recipe.train.limit_train, distributed=run.ctx.enabled, device_type=run.device.type,
    )  # fmt: skip
    try:
        if recipe.train.bn_calibration_batches:
            batches = (
                _to_device(images, labels, run.device, recipe.train.channels_last)[0]
                for images, labels in loaders.train
            )
            recalibrate_bn(run.student, batches, max_batches=recipe.train.bn_calibration_batches)
            broadcast_buffers(run.student, run.ctx)
        val = evaluate(run.student, loaders.val, run.device, run.dtype, recipe.train.channels_last, run.ctx)
    finally:
        loaders.close()
    tau = tau_at(0, stage.epochs, recipe.method)
    set_tau(run.student, tau)
    record = _record(run, 0, "converted", tau, 0.0, None, val)
    _write_recipe(run)  # only now: a run that failed before its first checkpoint does not block a new one
    _checkpoint(run, record, {"stage": 0, "epoch": 0, "step": 0, "optimizer": None, "scaler": None})


def _restore(run: _Run, state: dict) -> tuple[int, int]:
    """Loads the last checkpoint into the student and returns where to continue."""
    stage_index, epoch = _resume_position(state, run.recipe)
    flag_stage = min(state["stage"], len(run.recipe.stages) - 1)
    set_weight_binarization(run.student, run.recipe.stages[flag_stage].binarize_weights)
    from safetensors.torch import load_file

    load_weights(run.student, load_file(str(run.run_dir / ckpt.LAST), device=str(run.device)))
    run.best.update(state.get("best") or {})
    ckpt.restore_rng_state(state["rng"])
    _write_recipe(run)
    if state["optimizer"] is None:
        return 0, 0
    if run.ctx.is_main:
        run.reporter.message(f"resuming {run.run_dir} at stage {stage_index + 1}, epoch {epoch + 1}")
    return stage_index, epoch
