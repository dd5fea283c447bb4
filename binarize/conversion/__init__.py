"""The conversion pass: a float model in, a binary model and the record of what was done out.

The flow, one module per stage::

    trace (torch.fx) -> graph (facts) -> policy (a decision per layer) -> rewrite (activations,
    shortcuts) -> pipeline (swap in ReCU convs) -> record (what was done) -> report (costs)

``untraced`` converts by module names where torch.fx cannot trace; ``calibration`` re-estimates
BatchNorm statistics after conversion.
"""

from binarize.conversion.pipeline import binarize_meta, convert, recalibrate_bn
from binarize.conversion.policy import Policy
from binarize.conversion.report import Report, inspect

__all__ = ["Policy", "Report", "binarize_meta", "convert", "inspect", "recalibrate_bn"]
