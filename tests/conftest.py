"""Fixtures of the fine-tuning tests: a tiny CNN given by file specification, tiny image folders, a tiny recipe.

Everything here is small enough that a whole ``finetune`` run (BatchNorm re-estimation, epoch 0,
two epochs, checkpoints) takes a few seconds on two CPU cores. Nothing is autouse.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from binarize.recipes import Recipe, load_recipe

TINY_MODELS = '''
"""Tiny float CNNs for binarize's engine tests (loaded by file specification FILE.py:FACTORY)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """Float stem, two convs that become binary (>= 8 input channels), float head."""

    def __init__(self, num_classes=3, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self.pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                               "crop_pct": 1.0}

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class Teacher(nn.Module):
    """A different float architecture, used as a teacher given by specification."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Named(nn.Module):
    """Names that fool name-based parameter grouping: a float conv called "conv", a BatchNorm called "fc_bn"."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.body = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.body_bn = nn.BatchNorm2d(16)
        self.body_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.body_act(self.body_bn(self.body(x)))
        return self.fc(self.fc_bn(self.pool(x).flatten(1)))


def make_net(num_classes=3):
    return TinyNet(num_classes)


def make_teacher(num_classes=3):
    return Teacher(num_classes)


def make_named(num_classes=3):
    return Named(num_classes)
'''

TINY_RECIPE = """
name: tiny
description: tiny engine-test recipe
model: {{spec: "{spec}", num_classes: 3}}
policy: {{shortcuts: bireal}}
data: {{input_size: [3, 16, 16], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], crop_pct: 1.0, augmentation: cifar,
        workers: 0}}
method: {{tau_min: 0.85, tau_max: 0.99}}
stages:
  - name: main
    epochs: 2
    batch_size: 8
    optimizer: {{name: adam, lr: 5.0e-3}}
    schedule: {{name: step, warmup_epochs: 0.5, milestones: [1], gamma: 0.5}}
    distill: {{teacher: float, alpha: 0.5}}
train: {{seed: 0, device: cpu, precision: fp32, bn_calibration_batches: 2, log_every: 2}}
"""

TWO_STAGE_RECIPE = """
name: tiny-two-stage
description: tiny two-stage engine-test recipe
model: {{spec: "{spec}", num_classes: 3}}
policy: {{shortcuts: bireal}}
data: {{input_size: [3, 16, 16], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], crop_pct: 1.0, augmentation: cifar,
        workers: 0}}
stages:
  - name: float-weights
    epochs: 1
    batch_size: {batch}
    binarize_weights: false
    optimizer: {{name: adam, lr: 5.0e-3}}
    schedule: {{name: cosine}}
    distill: {{teacher: float, alpha: 1.0}}
  - name: binary-weights
    epochs: 1
    batch_size: {batch}
    optimizer: {{name: adam, lr: 2.0e-3}}
    schedule: {{name: cosine}}
    distill: {{teacher: float, alpha: 1.0}}
train: {{seed: 0, device: cpu, precision: fp32, bn_calibration_batches: 2, log_every: 2}}
"""


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("blue", "green", "red"),
    train: int = 16,
    val: int = 6,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """Writes ``root/{train,val}/<class>/<i>.png``: noise with one colour channel raised per class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] += 120
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python file with ``make_net``, ``make_teacher`` and ``make_named`` (specs ``FILE.py:make_net`` ...)."""
    path = tmp_path_factory.mktemp("models") / "tiny_models.py"
    path.write_text(textwrap.dedent(TINY_MODELS))
    return path


@pytest.fixture(scope="session")
def net_spec(tiny_models: Path) -> str:
    return f"{tiny_models}:make_net"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 16 train and 6 val images each, 16x16. Read-only: copy it to change it."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def make_images() -> Callable[..., Path]:
    """``make_images(root, classes=..., train=16, val=6, size=16)`` writes an image folder."""
    return write_image_folder


@pytest.fixture(scope="session")
def tiny_recipe_file(tmp_path_factory: pytest.TempPathFactory, net_spec: str) -> Path:
    """The tiny recipe: TinyNet, Bi-Real shortcuts, 2 epochs of batch 8 (6 steps each), Adam with half an epoch
    of warm-up and the rate halved after epoch 1 (a schedule whose first epochs do not depend on the number
    of epochs), distillation from the float model with alpha 0.5."""
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(spec=net_spec))
    return path


@pytest.fixture(scope="session")
def two_stage_recipe_file(tmp_path_factory: pytest.TempPathFactory, net_spec: str) -> Path:
    """Stage 1 (1 epoch) with float weights and binary activations, stage 2 (1 epoch) with binary weights."""
    path = tmp_path_factory.mktemp("recipes") / "two-stage.yaml"
    path.write_text(TWO_STAGE_RECIPE.format(spec=net_spec, batch=8))
    return path


@pytest.fixture(scope="session")
def tiny_recipe(tiny_recipe_file: Path) -> Callable[..., Recipe]:
    """``tiny_recipe(*overrides)``: the tiny recipe with ``--set`` style overrides."""

    def make(*overrides: str) -> Recipe:
        return load_recipe(tiny_recipe_file, list(overrides))

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared CPU, OpenMP threads waiting for each other make
    these tiny models several times slower (the result of each run does not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
