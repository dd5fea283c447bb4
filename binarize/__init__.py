"""binarize: turn a pretrained float PyTorch image model into a ReCU binary neural network.

The public API::

    import binarize
    float_model = binarize.create_model("cifar_resnet20", weights="resnet20.th")
    binary = binarize.convert(float_model, binarize.Policy(shortcuts="bireal"))
    binarize.recalibrate_bn(binary, batches)
    print(binarize.inspect(binary).to_dict()["summary"])
    binarize.save(binary, "resnet20-binary.safetensors")
    result = binarize.finetune(float_model, "cifar10-resnet20-posthoc", data_dir="cifar10", output_dir="runs/r20")
"""

from binarize._version import __version__
from binarize.conversion import (
    Policy,
    Report,
    binarize_meta,
    calibrate_thresholds,
    convert,
    inspect,
    recalibrate_bn,
    register_activation,
    register_binarizable,
    register_leaf_module,
)
from binarize.diagnostics import Diagnosis, LayerDiagnostics, SignTracker, diagnose
from binarize.engine import FinetuneResult, TauScheduler, evaluate, evaluate_file, finetune
from binarize.errors import BinarizeError
from binarize.files import load, run_record, save
from binarize.models import create_model
from binarize.nn import LayerOptions
from binarize.recipes import Recipe, load_recipe


def export(model_or_file, path, format: str = "packed", **options):
    """Exports a binary model for deployment: a packed 1-bit file, ONNX or QONNX.

    See :func:`binarize.deploy.export` (imported on first use, so that ``import binarize`` stays lean)
    for the arguments; ``binarize.load`` opens the packed file it writes.

    Example::

        >>> binarize.export("runs/r20/best.safetensors", "r20.packed.safetensors")
        >>> packed = binarize.load("r20.packed.safetensors")   # inference only, native 1-bit kernels
    """
    from binarize.deploy import export as export_model

    return export_model(model_or_file, path, format, **options)


__all__ = [
    "__version__",
    "BinarizeError",
    "Diagnosis",
    "FinetuneResult",
    "LayerDiagnostics",
    "LayerOptions",
    "Policy",
    "Recipe",
    "Report",
    "SignTracker",
    "TauScheduler",
    "binarize_meta",
    "calibrate_thresholds",
    "convert",
    "create_model",
    "diagnose",
    "evaluate",
    "evaluate_file",
    "export",
    "finetune",
    "inspect",
    "load",
    "load_recipe",
    "recalibrate_bn",
    "register_activation",
    "register_binarizable",
    "register_leaf_module",
    "run_record",
    "save",
]
