"""Schedules as pure functions of training progress: ReCU's tau and the learning rate."""

from __future__ import annotations

import math
from collections.abc import Sequence

from binarize.recipes import MethodConfig, ScheduleConfig, StageConfig

__all__ = ["tau_at", "lr_at", "lr_curve"]


def tau_at(progress: float, total: float, method: MethodConfig) -> float:
    """ReCU's exponential schedule ``tau(t) = A e^(t/T) + B`` (Xu et al. 2021, section 3.4).

    ``A = (tau_max - tau_min) / (e - 1)`` and ``B = tau_min - A``, so ``tau(0) = tau_min`` and
    ``tau(T) = tau_max``. With per-epoch granularity (the official code) ``t`` is the epoch index and
    ``tau_max`` itself is never reached: the last epoch uses ``tau((T - 1) / T)``.

    Args:
        progress: ``t``, in epochs (an integer for per-epoch, fractional for per-step granularity).
        total: ``T``, the number of epochs of the stage.
        method: ``tau_min`` and ``tau_max``.
    """
    a = (method.tau_max - method.tau_min) / (math.e - 1.0)
    b = method.tau_min - a
    return a * math.exp(progress / total) + b


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate at a global step of a stage: linear warm-up, then cosine, step or constant.

    Args:
        step: Optimizer steps taken in this stage before this one.
        steps_per_epoch: Optimizer steps per epoch.
        epochs: Epochs of the stage.
        base_lr: The peak rate.
        schedule: The schedule's settings.
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(schedule.warmup_epochs * steps_per_epoch)), total)  # a short run is all warm-up
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "step":
        epoch = step / steps_per_epoch
        return base_lr * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    span = max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return schedule.min_lr + (base_lr - schedule.min_lr) * cosine


def lr_curve(
    stages: Sequence[StageConfig], steps_per_epoch: Sequence[int], max_points: int = 2000
) -> list[tuple[float, float]]:
    """The learning rate of every optimizer step of a run, as ``(epoch, lr)`` points, from the schedules alone.

    The rate is a pure function of the step (:func:`lr_at`), so the curve needs nothing recorded
    during training. Step ``s`` of a stage that starts at epoch ``offset`` is drawn at
    ``offset + s / steps_per_epoch``. A stage with more than ``max_points`` steps is drawn at evenly
    spaced steps plus the first and last step, the end of the warm-up and the milestones.

    Args:
        stages: The recipe's stages, in order.
        steps_per_epoch: Optimizer steps per epoch of each stage.
        max_points: Points drawn per stage at most (plus the boundaries).
    """
    points: list[tuple[float, float]] = []
    offset = 0
    for stage, per_epoch in zip(stages, steps_per_epoch, strict=True):
        total = per_epoch * stage.epochs
        schedule = stage.schedule
        warmup = int(round(schedule.warmup_epochs * per_epoch))
        edges = {warmup - 1, warmup, total - 1}
        edges |= {m * per_epoch - 1 for m in schedule.milestones} | {m * per_epoch for m in schedule.milestones}
        stride = max(1, math.ceil(total / max_points))
        steps = sorted({*range(0, total, stride), *(e for e in edges if 0 <= e < total)})
        for step in steps:
            lr = lr_at(step, per_epoch, stage.epochs, stage.optimizer.lr, schedule)
            points.append((offset + step / max(per_epoch, 1), lr))
        offset += stage.epochs
    return points
