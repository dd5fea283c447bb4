"""Normalisation statistics shared by the data pipeline and the model zoo (no imports: cheap for both)."""

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet's RGB pixels in [0, 1]; also what the shared CIFAR-10 checkpoints were trained with."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet's RGB pixels in [0, 1]."""
