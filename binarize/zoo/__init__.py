"""Float architectures that timm does not ship, registered in timm's model registry on import.

Importing this package registers the CIFAR models of the ReCU paper (Xu et al., "ReCU: Reviving the Dead
Weights in Binary Neural Networks", ICCV 2021) under ``cifar_resnet20``, ``cifar_resnet32``,
``cifar_resnet44``, ``cifar_resnet56``, ``cifar_resnet18`` and ``cifar_vgg_small``, so that
``timm.create_model`` builds them like any timm model. It imports timm, so ``binarize/__init__.py``
does not import it; code that resolves model names imports it when needed.

Example::

    >>> import timm
    >>> import binarize.zoo
    >>> model = timm.create_model("cifar_resnet20", num_classes=10)
    >>> model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]
    ('conv1', 'linear')
"""

from binarize.zoo import cifar
from binarize.zoo.cifar import *  # noqa: F403 - the package re-exports the CIFAR architectures

__all__ = ["MODEL_NAMES", *cifar.__all__]

#: The model names this package registers in timm.
MODEL_NAMES: tuple[str, ...] = tuple(name for name in cifar.__all__ if name.startswith("cifar_"))
