"""The distillation teachers of a run: built once each, frozen, shared by the stages that name the same one."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from binarize._utils import unwrap
from binarize.errors import ConfigError
from binarize.models import SOURCE_ATTR, create_model
from binarize.recipes import DistillConfig, StageConfig

__all__ = ["Teachers", "check_float_teacher"]


class Teachers:
    """Builds and keeps the teachers a run's stages distil from.

    ``distill.teacher: float`` is a frozen copy of the float model before conversion; a model
    specification is built (with ``teacher_weights`` or ``teacher_pretrained``) for the dataset's
    classes. Each teacher is in eval mode, without gradients, on the run's device.

    Args:
        float_model: The user's float model (unconverted).
        num_classes: Classes of the dataset.
        device: Where the teachers run.
        channels_last: Use the channels-last memory format.
    """

    def __init__(self, float_model: nn.Module, num_classes: int, device: torch.device, channels_last: bool) -> None:
        self.float_model, self.num_classes, self.device, self.channels_last = (
            float_model,
            num_classes,
            device,
            channels_last,
        )
        self._built: dict[tuple[str, str | None, bool], nn.Module] = {}

    def for_stage(self, stage: StageConfig) -> nn.Module | None:
        """The teacher of a stage: for its logit distillation and its feature objectives (feature
        distillation, block reconstruction, which need it even with ``distill.alpha: 0``), or None."""
        features = stage.feature_distill.enabled or stage.block_reconstruction.enabled
        if features and not stage.distill.enabled and stage.distill.teacher != "none":
            return self._build(stage.distill)
        return self.get(stage.distill)

    def get(self, distill: DistillConfig) -> nn.Module | None:
        """The teacher of a stage's distillation settings, or None when it does not distil."""
        if not distill.enabled:
            return None
        return self._build(distill)

    def _build(self, distill: DistillConfig) -> nn.Module:
        key = (distill.teacher, distill.teacher_weights, distill.teacher_pretrained)
        if key not in self._built:
            if distill.teacher == "float":
                teacher = copy.deepcopy(unwrap(self.float_model))
            else:
                teacher = create_model(
                    distill.teacher,
                    pretrained=distill.teacher_pretrained,
                    num_classes=self.num_classes,
                    weights=distill.teacher_weights,
                    reset_head=False,  # a teacher whose head does not fit the classes cannot teach them
                )
            teacher.to(self.device).eval().requires_grad_(False)
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
            self._built[key] = teacher
        return self._built[key]


def check_float_teacher(float_model: nn.Module, stages: Sequence[StageConfig]) -> None:
    """Refuses to distil from a float model whose head was re-initialised for new classes (it is untrained).

    A model built for another label set than its weights (``create_model(..., weights=...,
    num_classes=N)``) carries ``binarize_source["head_reset"] = True``.

    Raises:
        ConfigError: A stage distils from such a float model.
    """
    source = getattr(unwrap(float_model), SOURCE_ATTR, None)
    if not (isinstance(source, dict) and source.get("head_reset")):
        return
    for stage in stages:
        if stage.distill.teacher == "float" and stage.distill.alpha > 0:
            raise ConfigError(
                f"stage '{stage.name}' distils from the float model, but its head was re-initialised for the new "
                "classes and is untrained: train the float model on them first, give a teacher trained on them "
                "(--set distill.teacher=SPEC --set distill.teacher_weights=FILE), or turn distillation off "
                "(--set distill.alpha=0 or --set distill.teacher=none)"
            )
