"""The training objective: label cross-entropy and ReActNet's distribution loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from binarize.recipes import DistillConfig

__all__ = ["distribution_loss", "training_loss", "top_k_correct"]


def distribution_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy between the teacher's softmax and the student's log-softmax, batch mean.

    ReActNet's "distribution loss" (Liu et al. 2020), used by ReCU's two-stage recipe. With a
    temperature ``T`` both distributions are softened and the loss is scaled by ``T^2``.
    """
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(target * log_probs).sum(dim=1).mean() * temperature**2


def training_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    distill: DistillConfig,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``alpha * distribution_loss + (1 - alpha) * label_ce``; labels only without a teacher."""
    if teacher_logits is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    loss = distill.alpha * distribution_loss(logits, teacher_logits, distill.temperature)
    if distill.alpha < 1.0:
        label_loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        loss = loss + (1.0 - distill.alpha) * label_loss
    return loss


def top_k_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose label is among the top-k logits, per k, as device tensors."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]
