"""One training epoch of a stage: the optimizer steps, with no host sync but the periodic loss read.

Every step sets the learning rate from the schedule (a pure function of the step), runs the student
(and the teacher) under autocast, and steps the optimizer through the gradient scaler. The loss is
read back to the host only every ``train.log_every`` steps (summed over processes, so that every
process stops together on a non-finite loss) and at the end of the epoch. With the feature
objectives (:mod:`~binarize.engine.feature_distill`) a step adds the feature loss, and the steps of
the block-reconstruction phase replace the logit loss by the blocks' reconstruction loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
from torch import nn

from binarize.data import Loader
from binarize.engine.distributed import DistContext, all_reduce_sum
from binarize.engine.evaluation import to_device
from binarize.engine.feature_distill import StageDistillation
from binarize.engine.losses import training_loss
from binarize.engine.progress import Reporter
from binarize.engine.schedules import lr_at
from binarize.engine.tau_scheduler import TauScheduler
from binarize.errors import TrainingError
from binarize.recipes import StageConfig, TrainConfig

__all__ = ["EpochContext", "train_epoch", "non_finite"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpochContext:
    """What every epoch of one stage needs, built once per stage.

    Attributes:
        model: What runs forward: the student, or its DistributedDataParallel / compiled wrapper.
        student: The plain student (tau is set and gradients are clipped on it).
        teacher: The frozen distillation teacher, or None.
        loader: The train loader, set to the epoch by the caller.
        optimizer: The stage's optimizer.
        scaler: The gradient scaler (enabled for fp16 only).
        stage: The stage's settings.
        tau: The stage's tau schedule (stepped after every optimizer step when it counts steps), or
            None for a model without binary weights.
        train: Execution settings (``channels_last``, ``log_every``).
        device: The process's device.
        dtype: The autocast dtype, None for full precision.
        ctx: This process's place in the job.
        reporter: Progress display.
        objectives: The stage's feature objectives (feature distillation, block reconstruction), or None.
    """

    model: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    loader: Loader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stage: StageConfig
    tau: TauScheduler | None
    train: TrainConfig
    device: torch.device
    dtype: torch.dtype | None
    ctx: DistContext
    reporter: Reporter
    objectives: StageDistillation | None = None


def train_epoch(context: EpochContext, epoch: int, step: int) -> tuple[dict[str, float], int]:
    """Trains one epoch (index ``epoch`` within the stage) starting at the stage's global ``step``.

    Returns:
        ``{"loss", "seconds", "images_per_s"}`` (the loss averaged over steps and processes, the
        throughput summed over processes) and the global step after the epoch.

    Raises:
        TrainingError: The running loss became non-finite.
    """
    c = context
    stage, device = c.stage, c.device
    steps = len(c.loader)
    c.model.train()
    loss_sum = torch.zeros((), device=device)
    images_seen, start = 0, time.perf_counter()
    params = [p for p in c.student.parameters() if p.requires_grad]
    c.reporter.start_epoch(epoch + 1, stage.epochs, steps, stage.name)
    for i, (images, labels) in enumerate(c.loader):
        images, labels = to_device(images, labels, device, c.train.channels_last)
        objectives = c.objectives
        if objectives is None:
            lr = lr_at(step, steps, stage.epochs, stage.optimizer.lr, stage.schedule)
        else:
            lr = objectives.lr(step, steps, stage)
            if objectives.switch and step == objectives.switch:
                c.optimizer.state.clear()  # end to end after block reconstruction: Adam's moments start afresh
        for group in c.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=c.dtype or torch.float32, enabled=c.dtype is not None):
            if objectives is not None and objectives.forced(step):
                loss = _block_reconstruction_loss(c, objectives, images)
            else:
                features = None if objectives is None else objectives.features
                with features.record() if features is not None else contextlib.nullcontext():
                    logits = c.model(images)
                    with torch.no_grad():
                        teacher_logits = c.teacher(images) if c.teacher is not None else None
                loss = training_loss(logits, labels, teacher_logits, stage.distill, stage.label_smoothing)
                if features is not None:
                    loss = loss + objectives.weight * features.loss()
        c.optimizer.zero_grad(set_to_none=True)
        c.scaler.scale(loss).backward()
        if stage.grad_clip is not None:
            c.scaler.unscale_(c.optimizer)
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        c.scaler.step(c.optimizer)
        c.scaler.update()
        step += 1
        if c.tau is not None and c.tau.per_step and step < steps * stage.epochs:
            c.tau.step()  # the next step's tau; the last step of the stage keeps its own
        loss_sum += loss.detach()
        images_seen += labels.shape[0]
        if (i + 1) % c.train.log_every == 0 or i + 1 == steps:
            # the sum over processes, so that every process stops together on a non-finite loss
            mean = all_reduce_sum(loss_sum.clone(), c.ctx).item() / ((i + 1) * c.ctx.world_size)
            if not math.isfinite(mean):
                raise non_finite("loss", epoch, stage, f" (step {i + 1})")
            c.reporter.step(i + 1, mean, images_seen / max(time.perf_counter() - start, 1e-9))
    seconds = time.perf_counter() - start
    totals = torch.zeros(2, device=device)
    totals[0] += loss_sum
    totals[1] += steps
    all_reduce_sum(totals, c.ctx)
    mean_loss = (totals[0] / totals[1]).item()
    images_total = images_seen * c.ctx.world_size
    return {"loss": mean_loss, "seconds": seconds, "images_per_s": images_total / max(seconds, 1e-9)}, step


def _block_reconstruction_loss(c: EpochContext, objectives: StageDistillation, images: torch.Tensor) -> torch.Tensor:
    """A teacher-forced step: the teacher runs first, then every student block starts from its input."""
    with objectives.blocks.record():
        with torch.no_grad():
            c.teacher(images)
        c.model(images)
    return objectives.blocks.loss()


def non_finite(what: str, epoch: int, stage: StageConfig, where: str = "") -> TrainingError:
    """The error that stops a run whose loss (or validation loss) became NaN or infinite."""
    return TrainingError(
        f"the {what} became non-finite in epoch {epoch + 1} of stage '{stage.name}'{where}; the last good "
        "checkpoint is kept: lower the learning rate or clip gradients (--set grad_clip=1.0)"
    )
