"""Dead-weight diagnostics of ReCU binary layers (Xu et al., ICCV 2021): what happens inside the network.

ReCU's argument is about the latent weights: the tail weights barely move ("dead weights"); the clamp
``[Q(1-tau), Q(tau)]`` revives them; tau trades quantization error against entropy. Per binary layer
and epoch this package measures (docs/diagnostics.md gives the formulas):

* ``clipped`` against ``clipped_nominal = 2 (1 - tau)``, ``quant_error``, ``entropy``, ``weight_shape``
  (:mod:`~binarize.diagnostics.figures`, from the weights);
* ``flip_rate``, ``changed_from_start``, ``never_flipped`` (:class:`SignTracker`, between snapshots);
* ``saturation`` (:mod:`~binarize.diagnostics.saturation`, on a few batches).

:func:`diagnose` returns them as a :class:`Diagnosis`, whose records are the lines of
``diagnostics.jsonl`` (:mod:`~binarize.diagnostics.history`); :mod:`~binarize.diagnostics.flags`
holds the rules that flag a layer. The plots (:mod:`binarize.diagnostics.plots`, matplotlib) and the
table (:mod:`binarize.diagnostics.table`, rich) are imported on demand.

Example::

    >>> tracker = SignTracker(binary)              # right after conversion
    >>> for epoch in range(1, epochs + 1):
    ...     train_one_epoch(binary)
    ...     diagnosis = diagnose(binary, val_loader, tracker=tracker)
    ...     append_records("runs/r20/diagnostics.jsonl", diagnosis.to_records(epoch))
"""

from binarize.diagnostics.diagnosis import RECORD_KEYS, Diagnosis, LayerDiagnostics, diagnose
from binarize.diagnostics.figures import WeightFigures, binary_layers, standardized_weights, weight_figures
from binarize.diagnostics.flags import FLAGS, Flag, layer_flags
from binarize.diagnostics.history import DIAGNOSTICS, History, append_records, read_history, trim_history
from binarize.diagnostics.saturation import measure_saturation
from binarize.diagnostics.tracker import SignFigures, SignTracker

__all__ = [
    "DIAGNOSTICS",
    "FLAGS",
    "RECORD_KEYS",
    "Diagnosis",
    "Flag",
    "History",
    "LayerDiagnostics",
    "SignFigures",
    "SignTracker",
    "WeightFigures",
    "append_records",
    "binary_layers",
    "diagnose",
    "layer_flags",
    "read_history",
    "measure_saturation",
    "standardized_weights",
    "trim_history",
    "weight_figures",
]
