"""The fine-tuning engine: schedules, optimizer groups, losses, checkpoints and the training loop."""

from binarize.engine.distributed import DistContext, from_environment
from binarize.engine.loop import FinetuneResult, evaluate, finetune, set_tau, set_weight_binarization
from binarize.engine.schedules import lr_at, tau_at
from binarize.engine.tau_scheduler import TauScheduler

__all__ = [
    "DistContext",
    "FinetuneResult",
    "TauScheduler",
    "evaluate",
    "finetune",
    "from_environment",
    "lr_at",
    "set_tau",
    "set_weight_binarization",
    "tau_at",
]
