"""binarize: turn a pretrained float PyTorch image model into a ReCU binary neural network.

The public API::

    import binarize
    float_model = binarize.create_model("cifar_resnet20", weights="resnet20.th")
    binary = binarize.convert(float_model, binarize.Policy(shortcuts="bireal"))
    binarize.recalibrate_bn(binary, batches)
    print(binarize.inspect(binary).to_dict()["summary"])
    binarize.save(binary, "resnet20-binary.safetensors")
"""

from binarize._version import __version__
from binarize.convert import binarize_meta, convert, recalibrate_bn
from binarize.errors import BinarizeError
from binarize.files import load, save
from binarize.models import create_model
from binarize.policy import Policy
from binarize.report import Report, inspect

__all__ = [
    "__version__",
    "BinarizeError",
    "Policy",
    "Report",
    "binarize_meta",
    "convert",
    "create_model",
    "inspect",
    "load",
    "recalibrate_bn",
    "save",
]
