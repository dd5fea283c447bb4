"""The conversion pass: a float model in, a binary model and the record of what was done out.

The flow, one module per stage::

    pipeline.convert: check the arguments, copy the model
      -> trace (torch.fx; leaves from registry) and propagate shapes
      -> traced: graph (facts) -> policy (a decision per layer, via layers) -> rewrite (activations)
         -> layers (swap in ReCU convs) -> rewrite (Bi-Real shortcuts)
      -> or, when torch.fx cannot trace the model, untraced: the same decisions and swaps by module name
      -> record (what was done) -> report (costs)

``registry`` holds what binarize knows about module types (binarizable convs, tracer leaves, ReLU-like
activations) and the decorators that extend it; ``inputs`` checks example inputs; ``calibration``
re-estimates BatchNorm statistics after conversion.
"""

from binarize.conversion.calibration import calibrate_thresholds, recalibrate_bn
from binarize.conversion.pipeline import convert
from binarize.conversion.policy import Policy
from binarize.conversion.record import binarize_meta
from binarize.conversion.registry import register_activation, register_binarizable, register_leaf_module
from binarize.conversion.report import Report, inspect

__all__ = [
    "Policy",
    "Report",
    "binarize_meta",
    "convert",
    "inspect",
    "recalibrate_bn",
    "calibrate_thresholds",
    "register_activation",
    "register_binarizable",
    "register_leaf_module",
]
