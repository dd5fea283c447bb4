"""The float CIFAR architectures of the ReCU paper, registered in timm.

ReCU (Xu et al., "ReCU: Reviving the Dead Weights in Binary Neural Networks", ICCV 2021) reports CIFAR-10
results for three families, defined here in full precision so that binarize can convert them:

* ``cifar_resnet20/32/44/56``: the CIFAR ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016, section 4.2): a 3x3 stem with 16 channels, three stages of n BasicBlocks with
  16/32/64 channels (n = 3, 5, 7, 9), option-A shortcuts (subsample, then zero-pad the new channels),
  global average pooling and a ``linear`` head. Parameter names follow the widely used
  ``akamaster/pytorch_resnet_cifar10`` checkpoints, which therefore load directly.
* ``cifar_resnet18``: ResNet-18 adapted to 32x32 inputs (3x3 stem without max-pool, 64/128/256/512
  channels) with the parameter-free shortcut used for binary networks: 2x2 average pooling, then zero
  padding of the channels.
* ``cifar_vgg_small``: VGG-Small (Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and
  Compact Deep Neural Networks", ECCV 2018): six 3x3 convolutions of 128-128-256-256-512-512 channels,
  max-pooling after the 2nd, 4th and 6th, and a linear ``classifier`` on the flattened 512x4x4 features.

Every model uses one ``nn.ReLU`` module per activation site, shortcuts that are modules rather than
lambdas, and no control flow on tensor values, so ``torch.fx.symbolic_trace`` traces it and graph passes
can replace single nodes. Every model carries a timm-style ``pretrained_cfg`` dict (also as
``default_cfg``) whose ``first_conv`` and ``classifier`` name the stem convolution and the head.

No weights can be downloaded: ``pretrained=True`` raises :class:`~binarize.models.PretrainedUnavailable` (a
:class:`~binarize.errors.ModelSpecError`); load a file with :func:`binarize.weights.load_weights` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import PretrainedCfg, get_pretrained_cfg, register_model
from torch import nn

from binarize.data.constants import IMAGENET_MEAN, IMAGENET_STD
from binarize.errors import ModelSpecError
from binarize.models import PretrainedUnavailable

__all__ = [
    "AvgPoolShortcut",
    "BasicBlock",
    "CifarResNet",
    "OptionAShortcut",
    "VGGSmall",
    "cifar_resnet18",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_vgg_small",
]

# Normalisation the shared CIFAR-10 checkpoints were trained with (ImageNet statistics, pixels in [0, 1]).
CIFAR_MEAN = IMAGENET_MEAN
CIFAR_STD = IMAGENET_STD


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut "option A" of He et al. 2016: subsample, then zero-pad the channels.

    Keeps every ``stride``-th pixel (``x[:, :, ::stride, ::stride]``) and pads ``planes - in_planes``
    zero channels, half before and half after the input channels (``planes // 4`` on each side when the
    channels double).

    Args:
        in_planes: Input channels.
        planes: Output channels, at least ``in_planes``.
        stride: Spatial subsampling factor.

    Example::

        >>> OptionAShortcut(16, 32, 2)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"OptionAShortcut cannot reduce channels ({in_planes} -> {planes})")
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class AvgPoolShortcut(nn.Module):
    """Parameter-free shortcut for binary ResNets: ``stride`` x ``stride`` average pooling, then zero padding.

    Average pooling (instead of subsampling) keeps information from every pixel in the shortcut, which
    matters when the residual branch is binary. The new channels are zeros, half before and half after.

    Args:
        in_planes: Input channels.
        planes: Output channels, at least ``in_planes``.
        stride: Pooling window and stride (1 means no pooling).

    Example::

        >>> AvgPoolShortcut(64, 128, 2)(torch.ones(1, 64, 8, 8)).shape
        torch.Size([1, 128, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"AvgPoolShortcut cannot reduce channels ({in_planes} -> {planes})")
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu2(bn2(conv2(relu1(bn1(conv1 x)))) + shortcut x)``.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
        shortcut: Shortcut class used when the shape changes, called as ``shortcut(in_planes, planes,
            stride)``; otherwise the shortcut is ``nn.Identity``.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: type[nn.Module] = OptionAShortcut
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = shortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _Classifier(nn.Module):
    """timm-style head helpers shared by the CIFAR models; the head module is named ``head_name``."""

    head_name = "linear"
    num_classes: int
    num_features: int
    pretrained_cfg: dict[str, Any]
    default_cfg: dict[str, Any]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when built with ``num_classes=0``)."""
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a freshly initialised one with ``num_classes`` outputs (0: no head)."""
        self.num_classes = num_classes
        setattr(self, self.head_name, _make_head(self.num_features, num_classes))
        if hasattr(self, "pretrained_cfg"):
            self.pretrained_cfg["num_classes"] = num_classes


class CifarResNet(_Classifier):
    """ResNet for 32x32 inputs: 3x3 stem, stages ``layer1..N`` of BasicBlocks, global pooling, ``linear``.

    Args:
        layers: Blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        widths: Channels per stage; the stem has ``widths[0]`` channels.
        num_classes: Outputs of the ``linear`` head; 0 replaces it by ``nn.Identity``.
        in_chans: Input image channels.
        shortcut: Shortcut class of the blocks that change shape (stride 2 at the first block of every
            stage but the first).

    Example::

        >>> model = CifarResNet((3, 3, 3), (16, 32, 64), num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: type[nn.Module] = OptionAShortcut,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must be non-empty, of equal length")
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self._stage_names = []
        in_planes = widths[0]
        for index, (blocks, planes) in enumerate(zip(layers, widths, strict=True)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self._stage_names.append(name)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = _make_head(self.num_features, num_classes)
        _kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, before pooling."""
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self._stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the ``linear`` head (skipped when ``pre_logits``)."""
        x = self.flatten(self.pool(x))
        return x if pre_logits else self.linear(x)


class VGGSmall(_Classifier):
    """VGG-Small for 32x32 inputs (Zhang et al. 2018), as used by binary-network papers on CIFAR.

    ``conv0`` (in_chans -> 128) + ``bn0`` + ``relu0``, then five 3x3 convolutions 128 -> 128 -> 256 -> 256
    -> 512 -> 512 (``conv1..conv5``), each followed by ``[pool] -> bn -> relu``; max-pooling (2x2) follows
    ``conv1``, ``conv3`` and ``conv5`` (``pool1``, ``pool3``, ``pool5``). The 512x4x4 features are
    flattened into the ``classifier`` (linear). Inputs must be 32x32.

    Args:
        num_classes: Outputs of the ``classifier``; 0 replaces it by ``nn.Identity``.
        in_chans: Input image channels.

    Example::

        >>> VGGSmall(num_classes=10)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    head_name = "classifier"
    _widths = (128, 128, 256, 256, 512, 512)
    _pooled = (1, 3, 5)

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self._widths[-1] * 4 * 4
        in_planes = in_chans
        for index, planes in enumerate(self._widths):
            self.add_module(f"conv{index}", nn.Conv2d(in_planes, planes, 3, stride=1, padding=1, bias=False))
            if index in self._pooled:
                self.add_module(f"pool{index}", nn.MaxPool2d(2, 2))
            self.add_module(f"bn{index}", nn.BatchNorm2d(planes))
            self.add_module(f"relu{index}", nn.ReLU())
            in_planes = planes
        self.flatten = nn.Flatten(1)
        self.classifier = _make_head(self.num_features, num_classes)
        _kaiming_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512x4x4 feature map after the last ``relu``."""
        for index in range(len(self._widths)):
            x = getattr(self, f"conv{index}")(x)
            if index in self._pooled:
                x = getattr(self, f"pool{index}")(x)
            x = getattr(self, f"relu{index}")(getattr(self, f"bn{index}")(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Flattening, then the ``classifier`` (skipped when ``pre_logits``)."""
        x = self.flatten(x)
        return x if pre_logits else self.classifier(x)


def _make_head(num_features: int, num_classes: int) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    nn.init.kaiming_normal_(head.weight)
    return head


def _kaiming_init(model: nn.Module) -> None:
    """He-normal initialisation of every conv and linear weight (He et al. 2015), as in the CIFAR ResNets."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


def _cfg(first_conv: str, classifier: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "input_size": (3, 32, 32),
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "num_classes": 10,
        "first_conv": first_conv,
        "classifier": classifier,
        **kwargs,
    }


_RESNET_PAPER = {"paper_name": "Deep Residual Learning for Image Recognition", "paper_ids": "arXiv:1512.03385"}

# timm's register_model reads this module-level dict and registers each entry as the model's default
# pretrained cfg, so timm.models.get_pretrained_cfg("cifar_resnet20") works. None of them has weights.
default_cfgs: dict[str, dict[str, Any]] = {
    **{
        f"cifar_resnet{depth}": _cfg(
            "conv1",
            "linear",
            pool_size=(8, 8),
            description=f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)",
            **_RESNET_PAPER,
        )
        for depth in (20, 32, 44, 56)
    },
    "cifar_resnet18": _cfg(
        "conv1",
        "linear",
        pool_size=(4, 4),
        description="ResNet-18 for 32x32 inputs with average-pool + zero-pad shortcuts (ReCU CIFAR recipes)",
        **_RESNET_PAPER,
    ),
    "cifar_vgg_small": _cfg(
        "conv0",
        "classifier",
        fixed_input_size=True,
        description="VGG-Small for 32x32 inputs (Zhang et al. 2018, LQ-Nets)",
        paper_name="LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
    ),
}


def _create(name: str, pretrained: bool, build: Any, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    """Builds a registered model, attaches its ``pretrained_cfg`` and handles timm's factory arguments."""
    if pretrained:
        raise PretrainedUnavailable(
            f"{name} has no downloadable weights",
            "create it with pretrained=False and load a weights file (binarize.weights.load_weights; --weights)",
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cfg_arg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise ModelSpecError(
            f"{name} does not take option(s) {', '.join(sorted(kwargs))}; it takes num_classes and in_chans"
        )
    model = build(num_classes=num_classes, in_chans=in_chans)
    model.pretrained_cfg = _resolve_cfg(name, num_classes, in_chans, cfg_arg, overlay)
    model.default_cfg = model.pretrained_cfg
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _resolve_cfg(
    name: str, num_classes: int, in_chans: int, cfg_arg: Any, overlay: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The model's ``pretrained_cfg`` as a dict: the registered one (or ``cfg_arg``) with ``overlay`` applied.

    ``num_classes`` and the channel count of ``input_size`` always describe the built model; with
    ``in_chans`` other than 3, ``mean`` and ``std`` become the averages of the RGB values, repeated.
    """
    if isinstance(cfg_arg, PretrainedCfg):
        cfg = dataclasses.replace(cfg_arg)
    elif isinstance(cfg_arg, Mapping):
        cfg = _replace(name, PretrainedCfg(), cfg_arg)
    elif cfg_arg is None or cfg_arg == "":
        cfg = get_pretrained_cfg(name) or PretrainedCfg(**default_cfgs[name])
    else:
        raise ModelSpecError(f"{name} has no pretrained tag '{cfg_arg}'; there are no downloadable weights")
    cfg = _replace(name, cfg, overlay or {})
    changes: dict[str, Any] = {
        "architecture": name,
        "num_classes": num_classes,
        "input_size": (in_chans, *tuple(cfg.input_size)[1:]),
    }
    if len(cfg.mean) != in_chans:
        changes["mean"] = (sum(cfg.mean) / len(cfg.mean),) * in_chans
        changes["std"] = (sum(cfg.std) / len(cfg.std),) * in_chans
    return dataclasses.replace(cfg, **changes).to_dict()


def _replace(name: str, cfg: PretrainedCfg, changes: Mapping[str, Any]) -> PretrainedCfg:
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ModelSpecError(f"{name}: unknown pretrained_cfg key(s) {', '.join(map(str, unknown))}")
    return dataclasses.replace(cfg, **changes)


def _resnet(layers: Sequence[int], widths: Sequence[int], shortcut: type[nn.Module]) -> Any:
    def build(num_classes: int, in_chans: int) -> CifarResNet:
        return CifarResNet(layers, widths, num_classes=num_classes, in_chans=in_chans, shortcut=shortcut)

    return build


@register_model
def cifar_resnet20(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 BasicBlocks, 16/32/64 channels, option-A shortcuts."""
    build = _resnet((3, 3, 3), (16, 32, 64), OptionAShortcut)
    return _create("cifar_resnet20", pretrained, build, num_classes, in_chans, kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (He et al. 2016): 3 stages of 5 BasicBlocks, 16/32/64 channels, option-A shortcuts."""
    build = _resnet((5, 5, 5), (16, 32, 64), OptionAShortcut)
    return _create("cifar_resnet32", pretrained, build, num_classes, in_chans, kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (He et al. 2016): 3 stages of 7 BasicBlocks, 16/32/64 channels, option-A shortcuts."""
    build = _resnet((7, 7, 7), (16, 32, 64), OptionAShortcut)
    return _create("cifar_resnet44", pretrained, build, num_classes, in_chans, kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (He et al. 2016): 3 stages of 9 BasicBlocks, 16/32/64 channels, option-A shortcuts."""
    build = _resnet((9, 9, 9), (16, 32, 64), OptionAShortcut)
    return _create("cifar_resnet56", pretrained, build, num_classes, in_chans, kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (ReCU CIFAR recipes): 4 stages of 2 blocks, 64-512 channels, no max-pool.

    Shortcuts that change shape are parameter-free: 2x2 average pooling, then zero-padded channels.
    """
    build = _resnet((2, 2, 2, 2), (64, 128, 256, 512), AvgPoolShortcut)
    return _create("cifar_resnet18", pretrained, build, num_classes, in_chans, kwargs)


@register_model
def cifar_vgg_small(pretrained: bool = False, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> VGGSmall:
    """VGG-Small (Zhang et al. 2018) for 32x32 inputs: 128-128-256-256-512-512 convs, linear ``classifier``."""
    return _create("cifar_vgg_small", pretrained, VGGSmall, num_classes, in_chans, kwargs)
