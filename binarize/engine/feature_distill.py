"""Block-wise feature distillation: the student's intermediate outputs matched to the teacher's.

A post-hoc student is the converted copy of its float teacher, with the same module names, so every
block has an aligned target. :class:`FeatureDistiller` registers forward hooks on the modules that
the recipe names (``feature_distill.layers``, glob patterns such as ``layer*.*.relu2``) in both
models, and :meth:`FeatureDistiller.loss` compares the outputs of the last student and teacher
forward, call by call:

* ``mse``: ``mean((S - T)^2) / mean(T^2)`` per layer, the squared error relative to the teacher's
  energy (the teacher's share is detached: a constant), so every layer weighs about the same;
* ``attention``: Real-to-Binary's attention matching (Martinez et al., ICLR 2020, eq. 2; after
  Zagoruyko & Komodakis 2017): ``Q = sum_c |A_c|^2`` per sample, a spatial map, and the loss is
  ``|| Q_S / ||Q_S||_2 - Q_T / ||Q_T||_2 ||_2`` averaged over the batch.

With ``teacher_forced`` the named modules are block boundaries instead (e.g. each block's final
activation ``layer*.*.relu2``): the teacher runs first, and in the student each boundary module, and
the conversion's copy of it on the binary path (``<name>_sign_input``), receives the *teacher's*
input in place of the student's. Every block then learns, in parallel and locally, to map the
teacher's block input to the teacher's block output (block reconstruction, as in BRECQ, Li et al.,
ICLR 2021); the loss compares the inputs of the boundary modules (the blocks' pre-activation
outputs), and no gradient crosses a boundary. The logits are then computed from teacher features,
so such a step has no logit or label loss.

The per-layer losses are averaged over the layers. The hooks only record while
:attr:`FeatureDistiller.recording` is set (the training step), so evaluation stores nothing. The
outputs a hook keeps are the ones the forward computes anyway (the teacher's under ``no_grad``), so
the cost is one extra elementwise pass per hooked output and no host synchronisation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from binarize._utils import closest
from binarize.conversion.rewrite import SIGN_INPUT_SUFFIX
from binarize.engine.schedules import lr_at
from binarize.errors import ConfigError
from binarize.recipes import StageConfig

__all__ = ["FeatureDistiller", "StageDistillation", "feature_loss", "attention_map", "resolve_layers"]

_EPS = 1e-12


def attention_map(features: Tensor) -> Tensor:
    """Real-to-Binary's spatial attention ``Q = sum_c |A_c|^2``, L2-normalised per sample, flattened to ``(N, H*W)``."""
    q = features.float().square().sum(dim=1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)


def feature_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """The loss between one student output and the teacher's (see the module docstring).

    Args:
        student: The student's output (gradient flows into it).
        teacher: The teacher's output of the same shape (treated as a constant).
        kind: ``mse`` or ``attention``.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"feature_distill.layers: a student output has shape {tuple(student.shape)} but the teacher's has "
            f"{tuple(teacher.shape)}; name layers whose outputs match (the teacher must be the float model)"
        )
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return (s - t).square().mean() / t.square().mean().clamp_min(_EPS)
    if kind == "attention":
        if s.dim() != 4:
            raise ConfigError(f"feature_distill.loss: attention needs (N, C, H, W) outputs, got {s.dim()} dims")
        return (attention_map(s) - attention_map(t)).norm(dim=1).mean()
    raise ConfigError(f"feature_distill.loss: must be 'mse' or 'attention', got {kind!r}")


def resolve_layers(
    student: nn.Module, teacher: nn.Module, patterns: Sequence[str], field: str = "feature_distill"
) -> list[str]:
    """The names of the modules of both models matched by ``patterns`` (fnmatch globs or exact names).

    A module the conversion added (``*_sign_input``) or removed is in only one of the models and is
    never matched.

    Args:
        student: The binary model.
        teacher: The float model it was converted from.
        patterns: Glob patterns or exact module names.
        field: The recipe field named in errors.

    Raises:
        ConfigError: A pattern matches no module present in both models.
    """
    teacher_names = {n for n, _ in teacher.named_modules() if n}
    both = [n for n, _ in student.named_modules() if n and n in teacher_names]
    names: list[str] = []
    for pattern in patterns:
        found = [n for n in both if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            hint = closest(pattern, both, n=3) or f"; names look like '{next((n for n in both if '.' in n), '')}'"
            raise ConfigError(
                f"{field}.layers: {pattern!r} matches no module of both the student and the teacher{hint} "
                "(glob patterns; the teacher must be the float model, distill.teacher: float)"
            )
        names += [n for n in found if n not in names]
    return names


class FeatureDistiller:
    """Forward hooks on aligned student and teacher modules and the loss between their outputs.

    Args:
        student: The binary model (its modules, not a DDP or compiled wrapper).
        teacher: The float teacher with the same module names.
        patterns: Glob patterns of the modules to match (``feature_distill.layers``).
        kind: ``mse`` or ``attention``.
        teacher_forced: Feed each matched module of the student the teacher's input (see the module
            docstring); the teacher must then run first in a step.

    Example::

        >>> distiller = FeatureDistiller(student, teacher, ["layer*.*.relu2"], "mse")
        >>> with distiller.record():
        ...     logits = student(x)
        ...     with torch.no_grad():
        ...         teacher(x)
        >>> loss = ce + 1.0 * distiller.loss()
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, patterns: Sequence[str], kind: str, teacher_forced: bool = False
    ) -> None:
        self.field = "block_reconstruction" if teacher_forced else "feature_distill"
        self.names = resolve_layers(student, teacher, patterns, self.field)
        self.kind = kind
        self.teacher_forced = teacher_forced
        self.recording = False
        self.outputs: dict[str, dict[str, list[Tensor]]] = {"student": {}, "teacher": {}}
        self._forced_calls: dict[str, int] = {}
        self._handles = []
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for name in self.names:
            if not teacher_forced:
                for side, modules in (("student", student_modules), ("teacher", teacher_modules)):
                    self._handles.append(modules[name].register_forward_hook(self._hook(side, name)))
                continue
            self._handles.append(teacher_modules[name].register_forward_pre_hook(self._record_input(name)))
            self._handles.append(student_modules[name].register_forward_pre_hook(self._force_input(name, name)))
            companion = f"{name}{SIGN_INPUT_SUFFIX}"  # the conversion's copy of the activation on the binary path
            if companion in student_modules:
                hook = self._force_input(name, companion)
                self._handles.append(student_modules[companion].register_forward_pre_hook(hook))

    def _hook(self, side: str, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self.recording and isinstance(output, Tensor):
                self.outputs[side].setdefault(name, []).append(output)

        return hook

    def _record_input(self, name: str):
        def hook(module: nn.Module, args) -> None:
            if self.recording:
                self.outputs["teacher"].setdefault(name, []).append(args[0])

        return hook

    def _force_input(self, name: str, module_name: str):
        """A student pre-hook that records the student's input (for ``name`` itself) and substitutes the teacher's."""

        def hook(module: nn.Module, args):
            if not self.recording:
                return None
            index = self._forced_calls.get(module_name, 0)
            self._forced_calls[module_name] = index + 1
            taught = self.outputs["teacher"].get(name, [])
            if index >= len(taught):
                raise ConfigError(
                    f"{self.field}: no teacher input for {module_name!r} (call {index + 1}); "
                    "the teacher must run before the student in a teacher-forced step"
                )
            if module_name == name:
                self.outputs["student"].setdefault(name, []).append(args[0])
            return (taught[index].to(args[0].dtype), *args[1:])

        return hook

    def record(self) -> _Recording:
        """A context in which the hooks keep the outputs (the forward passes of one training step)."""
        return _Recording(self)

    def loss(self) -> Tensor:
        """The mean over the hooked layers of the loss between the recorded outputs; clears them.

        Raises:
            ConfigError: A layer was called a different number of times in the two models.
        """
        student, teacher = self.outputs["student"], self.outputs["teacher"]
        losses = []
        for name in self.names:
            s, t = student.get(name, []), teacher.get(name, [])
            if len(s) != len(t) or not s:
                self.clear()
                raise ConfigError(
                    f"{self.field}.layers: {name!r} ran {len(s)} time(s) in the student and {len(t)} in the "
                    "teacher during one step; name modules that both models call once per forward"
                )
            losses += [feature_loss(a, b, self.kind) for a, b in zip(s, t, strict=True)]
        self.clear()
        return torch.stack(losses).mean()

    def clear(self) -> None:
        """Drops the recorded outputs."""
        for side in self.outputs.values():
            side.clear()
        self._forced_calls.clear()

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


class _Recording:
    def __init__(self, distiller: FeatureDistiller) -> None:
        self.distiller = distiller

    def __enter__(self) -> FeatureDistiller:
        self.distiller.clear()
        self.distiller.recording = True
        return self.distiller

    def __exit__(self, *exc) -> None:
        self.distiller.recording = False


class StageDistillation:
    """The feature-level objectives of one stage: end-to-end feature distillation and block reconstruction.

    Args:
        student: The binary model (unwrapped).
        teacher: The float teacher.
        stage: The stage's settings.
        steps_per_epoch: Optimizer steps per epoch of the stage.

    Attributes:
        features: The end-to-end :class:`FeatureDistiller`, or None.
        blocks: The teacher-forced :class:`FeatureDistiller` of the block-reconstruction phase, or None.
        switch: The stage step at which block reconstruction ends (0 without it).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, stage: StageConfig, steps_per_epoch: int) -> None:
        fd, blocks = stage.feature_distill, stage.block_reconstruction
        self.weight = fd.weight
        self.features = FeatureDistiller(student, teacher, fd.layers, fd.loss) if fd.enabled else None
        self.blocks = None
        self.switch = 0
        if blocks.enabled:
            self.blocks = FeatureDistiller(student, teacher, blocks.layers, blocks.loss, teacher_forced=True)
            total = steps_per_epoch * stage.epochs
            self.switch = min(max(1, round(blocks.fraction * total)), total)

    def forced(self, step: int) -> bool:
        """Whether stage step ``step`` is a block-reconstruction step."""
        return step < self.switch

    def lr(self, step: int, steps_per_epoch: int, stage: StageConfig) -> float:
        """The learning rate of a stage step: the stage's schedule over each phase's own steps."""
        opt, schedule = stage.optimizer, stage.schedule
        if self.switch == 0:
            return lr_at(step, steps_per_epoch, stage.epochs, opt.lr, schedule)
        total = steps_per_epoch * stage.epochs
        if step < self.switch:
            return lr_at(step, steps_per_epoch, self.switch / steps_per_epoch, opt.lr, schedule)
        return lr_at(step - self.switch, steps_per_epoch, (total - self.switch) / steps_per_epoch, opt.lr, schedule)

    def remove(self) -> None:
        """Removes every hook."""
        for distiller in (self.features, self.blocks):
            if distiller is not None:
                distiller.remove()
