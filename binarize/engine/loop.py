"""The fine-tuning engine: a float model and a recipe in, a trained binary model out.

``finetune`` = resolve the recipe -> build the float model (the default teacher) -> data -> convert
-> (fresh run) re-estimate BatchNorm statistics and evaluate "epoch 0" -> for each stage and epoch:
set tau, train, evaluate, record, checkpoint. A stage's loaders are built once (on a fresh run,
stage 0's also serve BatchNorm re-estimation and epoch 0). A training step never reads a value
back to the host; the loss is read every ``log_every`` steps for the progress display and the
non-finite check. The pieces live beside this module: :mod:`~binarize.engine.step` (one epoch),
:mod:`~binarize.engine.evaluation`, :mod:`~binarize.engine.rundir` (what may be written where),
:mod:`~binarize.engine.teachers`, :mod:`~binarize.engine.checkpoint`, :mod:`~binarize.engine.records`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from binarize._utils import mix_seed, unwrap
from binarize.conversion.calibration import calibrate_thresholds
from binarize.conversion.pipeline import convert, recalibrate_bn
from binarize.conversion.record import binarize_meta
from binarize.data import Datasets, Loaders, ResolvedData, build_datasets, build_loaders, resolve_data_config
from binarize.engine import checkpoint as ckpt
from binarize.engine.distributed import DistContext, broadcast_buffers, broadcast_parameters
from binarize.engine.evaluation import autocast_dtype, evaluate, to_device
from binarize.engine.feature_distill import StageDistillation, resolve_layers
from binarize.engine.layers import set_tau, set_weight_binarization, stage_tau_scheduler
from binarize.engine.monitor import RunMonitor
from binarize.engine.optim import build_optimizer
from binarize.engine.progress import Reporter, default_reporter
from binarize.engine.records import CURVES, MetricsLog, plot_curves
from binarize.engine.rundir import check_same_recipe, create_run_dir, prepare_run_dir, write_recipe
from binarize.engine.schedules import lr_curve, tau_at
from binarize.engine.step import EpochContext, non_finite, train_epoch
from binarize.engine.teachers import Teachers, check_float_teacher
from binarize.errors import ConfigError, DataError, TrainingInterrupted
from binarize.files import RunRecord, save
from binarize.models import create_model
from binarize.nn import ReCUConv2d
from binarize.recipes import Recipe, StageConfig, load_recipe
from binarize.weights import load_weights

__all__ = ["FinetuneResult", "finetune", "evaluate", "set_tau", "set_weight_binarization", "autocast_dtype"]


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


@dataclasses.dataclass(kw_only=True)
class _Run:
    """Everything the stages of a run share, built once per run.

    Attributes:
        train_images: Train images per epoch in this process (the limit_train subset, sharded).
        monitor: The run's dead-weight diagnostics (``diagnostics.jsonl``).
        checkpointed: The run directory holds a checkpoint of this run (after epoch 0, or resumed).
    """

    recipe: Recipe
    ctx: DistContext
    device: torch.device
    dtype: torch.dtype | None
    datasets: Datasets
    resolved: ResolvedData
    student: nn.Module
    run_dir: Path | None
    reporter: Reporter
    log: MetricsLog
    teachers: Teachers
    train_images: int
    monitor: RunMonitor
    best: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpointed: bool = False

    @property
    def writes(self) -> bool:
        return self.run_dir is not None and self.ctx.is_main


def _float_model(model: nn.Module | str | None, recipe: Recipe) -> nn.Module:
    if isinstance(model, nn.Module):
        plain = unwrap(model)
        if binarize_meta(plain) is not None or any(isinstance(m, ReCUConv2d) for m in plain.modules()):
            raise ConfigError(
                "model: this model is already converted to binary (it has ReCU layers); finetune takes the float "
                "model: it converts it itself and distils from it (the float model is the default teacher)"
            )
        return model
    spec = model or recipe.model.spec
    if not spec:
        raise ConfigError("model: no model given; pass --model SPEC or set model.spec in the recipe")
    return create_model(
        spec, pretrained=recipe.model.pretrained, num_classes=recipe.model.num_classes, weights=recipe.model.weights
    )


def _datasets(
    recipe: Recipe,
    resolved: ResolvedData,
    train_data: Dataset | None,
    val_data: Dataset | None,
    data_dir: str | Path | None,
) -> Datasets:
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


def _record(
    run: _Run, epoch: int, stage: str, tau: float, lr: float, train: dict[str, float] | None, val: dict[str, float]
) -> dict[str, Any]:
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


def _checkpoint(run: _Run, record: dict[str, Any], state: dict[str, Any]) -> None:
    """Writes last (and best) model files and the training state; only the main process writes.

    A newer checkpoint makes an ``interrupted.safetensors`` of an earlier interruption stale: it is removed.
    """
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
        (run.run_dir / ckpt.INTERRUPTED).unlink(missing_ok=True)


def _stage_loaders(run: _Run, stage: StageConfig) -> Loaders:
    train = run.recipe.train
    return build_loaders(
        run.datasets,
        stage.batch_size,
        run.recipe.data,
        seed=train.seed,
        limit_train=train.limit_train,
        limit_val=train.limit_val,
        distributed=run.ctx.enabled,
        device_type=run.device.type,
    )


def _start(run: _Run, loaders: Loaders) -> None:
    """A fresh run: re-estimate BatchNorm statistics, evaluate the converted model, then write epoch 0.

    The run directory is created only here, after epoch 0 (a run that fails earlier leaves nothing),
    and epoch 0's files are written with Ctrl-C held back (all of them or none).
    """
    recipe = run.recipe
    stage = recipe.stages[0]
    calibration = recipe.train.bn_calibration_batches
    if calibration:
        _recalibrate(run, loaders, calibration)
    if recipe.train.calibrate_thresholds:  # thresholds from the calibrated model, then its BatchNorm again
        with contextlib.closing(_train_images(run, loaders)) as batches:
            calibrate_thresholds(run.student, batches)
        broadcast_parameters(run.student, run.ctx)
        if calibration:
            _recalibrate(run, loaders, calibration)
    val = evaluate(run.student, loaders.val, run.device, run.dtype, recipe.train.channels_last, run.ctx)
    tau = tau_at(0, stage.epochs, recipe.method)
    set_tau(run.student, tau)
    with ckpt.interrupts_deferred():
        if run.writes:
            create_run_dir(run.run_dir)
        run.monitor.record(run.student, loaders.val, 0)
        record = _record(run, 0, "converted", tau, 0.0, None, val)
        if run.writes:
            write_recipe(run.run_dir, recipe)
        _checkpoint(
            run,
            record,
            {"stage": 0, "epoch": 0, "step": 0, "optimizer": None, "scaler": None, **run.monitor.state_dict()},
        )
        run.checkpointed = True


def _train_images(run: _Run, loaders: Loaders) -> Generator[torch.Tensor, None, None]:
    """The training loader's images on the run's device, for the calibration passes."""
    channels_last = run.recipe.train.channels_last
    return (to_device(images, labels, run.device, channels_last)[0] for images, labels in loaders.train)


def _recalibrate(run: _Run, loaders: Loaders, batches: int) -> None:
    """Re-estimates the student's BatchNorm statistics on ``batches`` training batches (on every process)."""
    with contextlib.closing(_train_images(run, loaders)) as images:
        recalibrate_bn(run.student, images, max_batches=batches)
    broadcast_buffers(run.student, run.ctx)


def _run_stage(
    run: _Run, stage_index: int, loaders: Loaders, start_epoch: int, state: dict[str, Any] | None, epoch_offset: int
) -> None:
    recipe, stage = run.recipe, run.recipe.stages[stage_index]
    set_weight_binarization(run.student, stage.binarize_weights)
    teacher = run.teachers.for_stage(stage)
    optimizer = build_optimizer(run.student, stage.optimizer)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype is torch.float16)
    step = start_epoch * len(loaders.train)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
    tau_scheduler = stage_tau_scheduler(run.student, recipe.method, stage.epochs, len(loaders.train), start_epoch, step)
    run.monitor.start_stage(run.student)
    model = run.student
    if run.ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device] if run.device.type == "cuda" else None
        )
    if recipe.train.compile:
        model = torch.compile(model)
    objectives = None
    if stage.feature_distill.enabled or stage.block_reconstruction.enabled:  # hooks on student and teacher
        objectives = StageDistillation(run.student, teacher, stage, len(loaders.train))
    context = EpochContext(
        model=model,
        student=run.student,
        teacher=teacher,
        loader=loaders.train,
        optimizer=optimizer,
        scaler=scaler,
        stage=stage,
        tau=tau_scheduler,
        train=recipe.train,
        device=run.device,
        dtype=run.dtype,
        ctx=run.ctx,
        reporter=run.reporter,
        objectives=objectives,
    )
    try:
        for epoch in range(start_epoch, stage.epochs):
            if tau_scheduler is not None and not tau_scheduler.per_step and epoch > start_epoch:
                tau_scheduler.step()  # tau(epoch): constant within the epoch, as in the paper's code
            tau = tau_at(epoch, stage.epochs, recipe.method)
            loaders.set_epoch(epoch)
            torch.manual_seed(mix_seed(recipe.train.seed, stage_index, epoch))
            train, step = train_epoch(context, epoch, step)
            if recipe.train.bn_refresh_batches:  # statistics of the epoch's final weights
                _recalibrate(run, loaders, recipe.train.bn_refresh_batches)
            broadcast_buffers(run.student, run.ctx)
            val = evaluate(model, loaders.val, run.device, run.dtype, recipe.train.channels_last, run.ctx)
            if not math.isfinite(val["loss"]):  # the last step broke the model: do not checkpoint it
                raise non_finite("validation loss", epoch, stage)
            lr = optimizer.param_groups[0]["lr"]
            record = _record(run, epoch_offset + epoch + 1, stage.name, tau, lr, train, val)
            run.monitor.record(run.student, loaders.val, epoch_offset + epoch + 1)
            state = {
                "stage": stage_index,
                "epoch": epoch + 1,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                **run.monitor.state_dict(),
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
        if objectives is not None:
            objectives.remove()


def _resume_position(state: dict[str, Any], recipe: Recipe) -> tuple[int, int]:
    stage, epoch = state["stage"], state["epoch"]
    if epoch >= recipe.stages[stage].epochs:
        return stage + 1, 0
    return stage, epoch


def _restore(run: _Run, state: dict[str, Any]) -> tuple[int, int]:
    """Loads the last checkpoint into the student and returns where to continue."""
    stage_index, epoch = _resume_position(state, run.recipe)
    flag_stage = min(state["stage"], len(run.recipe.stages) - 1)
    set_weight_binarization(run.student, run.recipe.stages[flag_stage].binarize_weights)
    from safetensors.torch import load_file

    load_weights(run.student, load_file(str(run.run_dir / ckpt.LAST), device=str(run.device)))
    run.best.update(state.get("best") or {})
    ckpt.restore_rng_state(state["rng"])
    run.monitor.restore(state, _global_epoch(run.recipe, state))
    if run.writes:
        write_recipe(run.run_dir, run.recipe)
    if state["optimizer"] is None:
        return 0, 0
    if run.ctx.is_main:
        run.reporter.message(f"resuming {run.run_dir} at stage {stage_index + 1}, epoch {epoch + 1}")
    return stage_index, epoch


def _train(run: _Run, state: dict[str, Any] | None) -> None:
    """Epoch 0 (fresh run) or the restored checkpoint, then every remaining stage with its own loaders."""
    stages = run.recipe.stages
    first_stage, first_epoch = (0, 0) if state is None else _restore(run, state)
    for index in range(first_stage, len(stages)):
        loaders = _stage_loaders(run, stages[index])
        try:
            if state is None and index == 0:
                _start(run, loaders)  # stage 0's loaders (and their workers) serve epoch 0 too
            start = first_epoch if index == first_stage else 0
            stage_state = state if (state is not None and index == first_stage and first_epoch > 0) else None
            _run_stage(run, index, loaders, start, stage_state, sum(s.epochs for s in stages[:index]))
        finally:
            loaders.close()


def _interrupted(run: _Run) -> TrainingInterrupted:
    """Ctrl-C outside a training epoch (BatchNorm re-estimation, epoch 0, a stage's set-up): nothing new is saved."""
    if run.run_dir is None:
        return TrainingInterrupted("interrupted; saved nothing (no output directory)")
    if run.checkpointed:
        return TrainingInterrupted(
            f"interrupted between epochs; nothing new saved: resume with --resume, which continues from "
            f"{run.run_dir / ckpt.LAST}"
        )
    return TrainingInterrupted(
        "interrupted before the first checkpoint (BatchNorm re-estimation and the epoch-0 evaluation); "
        f"nothing saved ({run.run_dir} was not created): run the same command again to start afresh"
    )


def _global_epoch(recipe: Recipe, state: dict[str, Any]) -> int:
    return sum(s.epochs for s in recipe.stages[: state["stage"]]) + state["epoch"]


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
            None takes the recipe's ``model.spec``. An already converted model is refused.
        recipe: A :class:`~binarize.recipes.Recipe`, a shipped recipe name or a YAML file.
        train_data: A training dataset of ``(image tensor, label)``; with ``val_data``, instead of
            ``data_dir``. It needs ``classes`` or ``targets``.
        val_data: The validation dataset.
        data_dir: The dataset directory (see :mod:`binarize.data`).
        output_dir: Run directory for checkpoints, ``metrics.jsonl``, the resolved recipe and curves;
            None writes nothing. It is created when epoch 0 is written.
        resume: Continue the run in ``output_dir`` from its last checkpoint.
        ctx: This process's place in a torchrun job (:func:`binarize.engine.distributed.from_environment`).
        reporter: Progress display; on the main process by default
            :func:`~binarize.engine.progress.default_reporter` on standard error (rich bars on a
            terminal, plain lines otherwise).

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        BinarizeError: One-line errors for bad settings, data or output directories;
            :class:`~binarize.errors.TrainingInterrupted` on Ctrl-C, saying what was saved.

    Example::

        >>> result = finetune(float_model, "cifar10-resnet20-posthoc", data_dir="cifar10", output_dir="runs/r20")
        >>> result.best["val_top1"]
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    ctx = ctx or DistContext()
    device = ctx.device(recipe.train.device)
    ctx.init_process_group(device)
    torch.manual_seed(recipe.train.seed)
    run_dir = prepare_run_dir(output_dir, resume, ctx)
    state = ckpt.load_state(run_dir) if resume else None
    if resume:
        check_same_recipe(run_dir, recipe, state)
    float_model = _float_model(model, recipe)
    check_float_teacher(float_model, recipe.stages)
    resolved = resolve_data_config(recipe.data, float_model)
    datasets = _datasets(recipe, resolved, train_data, val_data, data_dir)
    float_model.to(device)
    _check_classes(float_model, datasets.num_classes, resolved.input_size, device)
    example = (torch.zeros(1, *resolved.input_size, device=device),)
    student = convert(float_model, recipe.policy, example, layer=recipe.layer_options(0)).to(device)
    _check_feature_layers(student, float_model, recipe.stages)
    if recipe.train.channels_last:
        student.to(memory_format=torch.channels_last)
    if reporter is None:
        reporter = default_reporter() if ctx.is_main else Reporter()
    keep_until = None if state is None else _global_epoch(recipe, state)
    log = MetricsLog(run_dir if ctx.is_main else None, keep_until=keep_until)
    run = _Run(
        recipe=recipe,
        ctx=ctx,
        device=device,
        dtype=autocast_dtype(recipe.train.precision, device),
        datasets=datasets,
        resolved=resolved,
        student=student,
        run_dir=run_dir,
        reporter=reporter,
        log=log,
        teachers=Teachers(float_model, datasets.num_classes, device, recipe.train.channels_last),
        train_images=(recipe.train.limit_train or len(datasets.train)) // ctx.world_size,
        checkpointed=state is not None,
        monitor=RunMonitor(recipe.train, run_dir, ctx.is_main),
    )
    try:
        _train(run, state)
        if run.writes:
            steps = [run.train_images // s.batch_size for s in recipe.stages]
            plot_curves(
                log.records, run_dir / CURVES, lr_curve=lr_curve(recipe.stages, steps), title=_title(recipe, run_dir)
            )
            run.monitor.plot(run.student)
    except KeyboardInterrupt:
        raise _interrupted(run) from None
    finally:
        log.close()
        reporter.close()
    return FinetuneResult(student.eval(), dict(run.best), list(log.records), run_dir)


def _check_feature_layers(student: nn.Module, float_model: nn.Module, stages: Sequence[StageConfig]) -> None:
    """Checks, before any work, that the module patterns of every stage distilling features from the float
    model name modules of both models (a teacher given by specification is checked when its stage starts)."""
    for stage in stages:
        if stage.distill.teacher != "float":
            continue
        if stage.feature_distill.enabled:
            resolve_layers(student, unwrap(float_model), stage.feature_distill.layers, "feature_distill")
        if stage.block_reconstruction.enabled:
            resolve_layers(student, unwrap(float_model), stage.block_reconstruction.layers, "block_reconstruction")


def _title(recipe: Recipe, run_dir: Path) -> str:
    return f"{recipe.name}: {run_dir.resolve().name}"
