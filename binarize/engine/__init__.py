"""The fine-tuning engine: schedules, optimizer groups, losses, checkpoints, evaluation and the training loop.

Modules, one concern each: ``loop`` (``finetune`` and the stage loop), ``step`` (one training
epoch), ``evaluation`` (``evaluate``, ``evaluate_file``), ``layers`` (tau and weight binarization
of the binary layers), ``rundir`` (run-directory rules), ``teachers`` (distillation teachers),
``checkpoint``, ``records`` (metrics and curves), ``progress`` (reporters), ``schedules``,
``optim``, ``losses``, ``distributed``.
"""

from binarize.engine.checkpoint import BEST, LAST
from binarize.engine.distributed import DistContext, from_environment
from binarize.engine.evaluation import autocast_dtype, eval_loader, evaluate, evaluate_file
from binarize.engine.layers import set_tau, set_weight_binarization
from binarize.engine.loop import FinetuneResult, finetune
from binarize.engine.progress import PlainReporter, Reporter, RichReporter, default_reporter
from binarize.engine.schedules import lr_at, lr_curve, tau_at
from binarize.engine.tau_scheduler import TauScheduler

__all__ = [
    "BEST",
    "DistContext",
    "LAST",
    "FinetuneResult",
    "TauScheduler",
    "PlainReporter",
    "Reporter",
    "RichReporter",
    "autocast_dtype",
    "default_reporter",
    "eval_loader",
    "evaluate",
    "evaluate_file",
    "finetune",
    "from_environment",
    "lr_at",
    "lr_curve",
    "set_tau",
    "set_weight_binarization",
    "tau_at",
]
