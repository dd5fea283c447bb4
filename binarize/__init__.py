"""binarize: turn a pretrained float PyTorch image model into a ReCU binary neural network."""

from binarize._version import __version__
from binarize.errors import BinarizeError

__all__ = ["__version__", "BinarizeError"]
