"""Tests of binarize.data: the data section, resolution, transforms, datasets, subsets and loaders."""

from __future__ import annotations

import collections
import multiprocessing
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _shared_data import CIFAR10_CLASSES, extract_cifar10
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from binarize.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VAL_SUBSET_SEED,
    DataConfig,
    Datasets,
    EpochSampler,
    ResolvedData,
    build_datasets,
    build_eval_dataset,
    build_eval_loader,
    build_loaders,
    build_transforms,
    resolve_data_config,
    stratified_subset,
)
from binarize.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 30 images of each class of the shared CIFAR-10 train and test splits."""
    return extract_cifar10(tmp_path_factory.mktemp("cifar10"), per_class=30)


def make_tree(root: Path, spec: dict[str, dict[str, int]], size: tuple[int, int] = (12, 10)) -> Path:
    """Writes ``root/<split>/<class>/<i>.png`` with ``spec[split][class]`` small distinct images."""
    for split, classes in spec.items():
        for label, (name, count) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", size, (20 * label, 7 * i % 256, 100)).save(folder / f"{i:03d}.png")
    return root


TREE = {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}}
SMALL = ResolvedData(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augmentation="cifar")


class Noisy(Dataset):
    """Item i: ``([i, r1, r2], i % classes)``; r1 and r2 come from the global torch RNG, like augmentation."""

    def __init__(self, n: int, classes: int = 4) -> None:
        self.targets = [i % classes for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.cat([torch.tensor([float(index)]), torch.rand(2)]), self.targets[index]


def noisy(n: int = 40, n_val: int = 10) -> Datasets:
    return Datasets(train=Noisy(n), val=Noisy(n_val), classes=["a", "b", "c", "d"])


def epoch_batches(loaders, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loaders.set_epoch(epoch, start_batch)
    return list(loaders.train)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------- DataConfig


def test_data_config_round_trips_through_yaml() -> None:
    cfg = DataConfig(input_size=(3, 32, 32), mean=(0.4, 0.5, 0.6), interpolation="bicubic", crop_pct=1.0, workers=0)
    text = yaml.safe_dump({"data": cfg.to_dict()})
    assert DataConfig.from_dict(yaml.safe_load(text)["data"], "data") == cfg
    assert DataConfig.from_dict({}) == DataConfig()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"worker": 2}, "data: unknown key 'worker'; did you mean 'workers'?"),
        ({"dataset": "cifar-10"}, "data.dataset: must be one of 'folder', 'cifar10', 'cifar100', got 'cifar-10'"),
        ({"workers": "2"}, "data.workers: expected an integer, got '2'"),
        ({"input_size": [32, 32]}, "data.input_size: expected a list of 3 values, got 2"),
        ({"augmentation": "randaugment"}, "data.augmentation: must be one of"),
        ({"download": "yes"}, "data.download: expected true or false"),
        ({"workers": -1}, "data.workers: must be >= 0"),
    ],
)
def test_data_config_from_dict_is_strict(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig.from_dict(data, "data")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"workers": -1}, "workers: must be >= 0"),
        ({"crop_pct": 0.0}, "crop_pct: must be in (0, 1]"),
        ({"crop_pct": 1.5}, "crop_pct: must be in (0, 1]"),
        ({"input_size": (2, 32, 32)}, "input_size: channels (first value) must be 1 or 3, got 2"),
        ({"input_size": (3, 4, 32)}, "input_size: height and width must be >= 8 pixels, got 4x32"),
        ({"input_size": (3, 32)}, "input_size: give [channels, height, width]"),
        ({"mean": (0.5, 0.5)}, "mean: give 3 values (R, G, B), got 2"),
        ({"std": (0.2, 0.0, 0.2)}, "std: values must be > 0"),
        ({"mean": (0.5, float("nan"), 0.5)}, "mean: values must be finite"),
        ({"download": True}, "download: applies only to dataset cifar10 or cifar100"),
        ({"dataset": "cifar10", "val_split": "val"}, "val_split: applies only to dataset 'folder'"),
        ({"val_split": "train"}, "val_split: must name a folder under the data root other than 'train'"),
        ({"val_split": "a/b"}, "val_split: must name a folder"),
        ({"augmentation": "imagnet"}, "augmentation: must be one of 'auto', 'cifar', 'imagenet', 'none'"),
        ({"interpolation": "lanczos"}, "interpolation: must be one of 'bilinear', 'bicubic', 'nearest'"),
    ],
)
def test_data_config_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(**kwargs)
    assert fragment in str(info.value)


def test_data_config_accepts_edge_values() -> None:
    DataConfig(input_size=(1, 8, 8), crop_pct=1.0, workers=0, dataset="cifar100", download=True)
    DataConfig(val_split="validation")


# --------------------------------------------------------------------------- resolve_data_config


class FakeModel(nn.Module):
    def __init__(self, pretrained_cfg: dict | None) -> None:
        super().__init__()
        if pretrained_cfg is not None:
            self.pretrained_cfg = pretrained_cfg


MODEL_CFG = {"input_size": (3, 40, 48), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bicubic"}


def test_resolve_takes_the_model_values() -> None:
    resolved = resolve_data_config(DataConfig(), FakeModel({**MODEL_CFG, "crop_pct": 0.9}))
    assert resolved == ResolvedData((3, 40, 48), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 0.9, "cifar")


def test_resolve_prefers_the_recipe() -> None:
    cfg = DataConfig(input_size=(3, 96, 96), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="nearest", crop_pct=1.0)
    resolved = resolve_data_config(cfg, FakeModel({**MODEL_CFG, "crop_pct": 0.9}))
    assert resolved == ResolvedData((3, 96, 96), (0.5,) * 3, (0.25,) * 3, "nearest", 1.0, "imagenet")


@pytest.mark.parametrize("model", [None, FakeModel(None), FakeModel({"input_size": (3, 4), "interpolation": "random"})])
def test_resolve_defaults_to_imagenet(model: nn.Module | None) -> None:
    assert resolve_data_config(DataConfig(), model) == ResolvedData(
        (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875, "imagenet"
    )


@pytest.mark.parametrize(
    ("size", "augmentation", "expected"),
    [
        (32, "auto", "cifar"),
        (64, "auto", "cifar"),
        (65, "auto", "imagenet"),
        (32, "imagenet", "imagenet"),
        (224, "none", "none"),
    ],
)
def test_resolve_augmentation(size: int, augmentation: str, expected: str) -> None:
    cfg = DataConfig(input_size=(3, size, size), augmentation=augmentation)
    assert resolve_data_config(cfg).augmentation == expected


def test_resolve_fits_statistics_to_the_channels() -> None:
    gray = resolve_data_config(DataConfig(input_size=(1, 28, 28)))
    assert gray.mean == pytest.approx((0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406,))
    assert len(gray.std) == 1
    from_one = resolve_data_config(DataConfig(), FakeModel({"mean": (0.5,), "std": (0.2,)}))
    assert from_one.mean == (0.5, 0.5, 0.5) and from_one.std == (0.2, 0.2, 0.2)


def test_resolve_reads_a_timm_model() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    pre = model.pretrained_cfg
    resolved = resolve_data_config(DataConfig(), model)
    assert resolved.input_size == tuple(pre["input_size"])
    assert resolved.mean == tuple(pre["mean"]) and resolved.std == tuple(pre["std"])
    assert (resolved.interpolation, resolved.crop_pct) == (pre["interpolation"], pre["crop_pct"])


def test_import_does_not_load_timm() -> None:
    code = "import sys, binarize.data; sys.exit('timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --------------------------------------------------------------------------- build_transforms


def normalised(image: Image.Image, mean: tuple, std: tuple) -> torch.Tensor:
    pixels = (
        torch.from_numpy(np.array(image, dtype=np.float32)).reshape(image.height, image.width, -1).permute(2, 0, 1)
        / 255
    )
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = 3 if mode == "RGB" else 1
    data = torch.randint(0, 256, (height, width, channels), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(data.squeeze(-1).to(torch.uint8).numpy(), mode)


@pytest.mark.parametrize("input_size", [(3, 32, 32), (3, 24, 40), (1, 16, 16)])
@pytest.mark.parametrize("source", [(32, 32), (50, 40), (20, 70)])
@pytest.mark.parametrize("augmentation", ["cifar", "imagenet", "none"])
def test_transform_output_shapes(input_size: tuple, source: tuple, augmentation: str) -> None:
    resolved = resolve_data_config(DataConfig(input_size=input_size, augmentation=augmentation))
    for train in (True, False):
        out = build_transforms(resolved, train=train)(random_image(*source))
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == input_size


def test_eval_transform_of_an_image_at_the_input_size_only_normalises() -> None:
    resolved = ResolvedData((3, 32, 32), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic", 1.0, "cifar")
    image = random_image(32, 32)
    out = build_transforms(resolved, train=False)(image)
    assert torch.allclose(out, normalised(image, resolved.mean, resolved.std), atol=1e-6)


def test_eval_transform_resizes_by_crop_pct_then_center_crops() -> None:
    # A 32 px input at crop_pct 0.5 resizes a 32 px image to 64 px and keeps its central half: a 2x zoom.
    resolved = ResolvedData((3, 32, 32), (0.0,) * 3, (1.0,) * 3, "nearest", 0.5, "none")
    image = random_image(32, 32)
    out = build_transforms(resolved, train=False)(image)
    zoom = normalised(image, (0.0,) * 3, (1.0,) * 3)[:, 8:24, 8:24].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.allclose(out, zoom, atol=1e-6)


def test_transform_converts_grayscale_and_rgb() -> None:
    rgb = resolve_data_config(DataConfig(input_size=(3, 16, 16), crop_pct=1.0))
    gray = resolve_data_config(DataConfig(input_size=(1, 16, 16)))
    gray_image = random_image(16, 16, mode="L")
    out = build_transforms(rgb, train=False)(gray_image)
    assert out.shape == (3, 16, 16)
    pixels = out * torch.tensor(rgb.std)[:, None, None] + torch.tensor(rgb.mean)[:, None, None]
    assert torch.allclose(pixels, normalised(gray_image, (0,), (1,)).expand(3, -1, -1), atol=1e-6)
    assert build_transforms(gray, train=True)(random_image(16, 16).convert("RGBA")).shape == (1, 16, 16)


def test_cifar_train_transform_pads_crops_and_is_seeded() -> None:
    resolved = ResolvedData((3, 32, 32), (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0, "cifar")
    transform = build_transforms(resolved, train=True)
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    outs = []
    for seed in range(20):
        torch.manual_seed(seed)
        outs.append(transform(white))
    torch.manual_seed(3)
    assert torch.equal(transform(white), outs[3])
    assert all(set(o.unique().tolist()) <= {0.0, 1.0} for o in outs)  # padding is black, the rest untouched
    assert sum(bool((o == 0).any()) for o in outs) >= 10  # most crops are shifted into the padding
    assert len({tuple((o == 0).sum(dim=(0, 1)).tolist()) for o in outs}) > 5  # and at different offsets


def test_none_augmentation_trains_with_the_eval_transform() -> None:
    resolved = ResolvedData((3, 24, 24), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875, "none")
    image = random_image(40, 30)
    assert torch.equal(build_transforms(resolved, train=True)(image), build_transforms(resolved, train=False)(image))


# --------------------------------------------------------------------------- stratified_subset


def counts(targets: list[int], indices: list[int]) -> dict[int, int]:
    return dict(sorted(collections.Counter(targets[i] for i in indices).items()))


def test_stratified_subset_keeps_proportions() -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 20
    assert counts(targets, stratified_subset(targets, 10, seed=0)) == {0: 5, 1: 3, 2: 2}
    # 4 of 3x5: quotas 1.33 each, the one left over goes to the lowest label
    assert counts([0] * 5 + [1] * 5 + [2] * 5, stratified_subset([0] * 5 + [1] * 5 + [2] * 5, 4, seed=0)) == {
        0: 2,
        1: 1,
        2: 1,
    }


def test_stratified_subset_keeps_every_class_when_it_can() -> None:
    targets = [0] * 97 + [1, 2, 3]
    assert counts(targets, stratified_subset(targets, 4, seed=0)) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert counts(targets, stratified_subset(targets, 10, seed=0)) == {0: 7, 1: 1, 2: 1, 3: 1}
    assert len(stratified_subset(targets, 2, seed=0)) == 2


def test_stratified_subset_is_seeded_sorted_and_random() -> None:
    targets = [i // 10 for i in range(100)]
    first = stratified_subset(targets, 20, seed=1)
    assert first == stratified_subset(targets, 20, seed=1) == sorted(first)
    assert first != stratified_subset(targets, 20, seed=2)
    assert first != [i for i in range(100) if i % 10 < 2]  # not the first files of each class


def test_stratified_subset_returns_everything_when_n_is_large() -> None:
    assert stratified_subset([3, 1, 2], 3, seed=0) == [0, 1, 2]
    assert stratified_subset([3, 1, 2], 10, seed=0) == [0, 1, 2]
    with pytest.raises(ConfigError, match="limit_train: must be at least 1"):
        stratified_subset([3, 1, 2], 0, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    targets=st.lists(st.integers(0, 6), min_size=1, max_size=200),
    fraction=st.floats(0.01, 1.2),
    seed=st.integers(0, 2**32),
)
def test_stratified_subset_properties(targets: list[int], fraction: float, seed: int) -> None:
    n = max(1, round(fraction * len(targets)))
    chosen = stratified_subset(targets, n, seed)
    assert len(chosen) == len(set(chosen)) == min(n, len(targets))
    assert all(0 <= i < len(targets) for i in chosen)
    per_class, sizes = counts(targets, chosen), collections.Counter(targets)
    if n >= len(sizes):
        assert set(per_class) == set(sizes)
    quotas = {c: n * size / len(targets) for c, size in sizes.items()}
    if n < len(targets) and min(quotas.values()) >= 1:
        assert all(abs(per_class[c] - q) < 1 for c, q in quotas.items())


# --------------------------------------------------------------------------- build_datasets


def test_folder_datasets_on_cifar10(cifar_small: Path) -> None:
    resolved = resolve_data_config(DataConfig(input_size=(3, 32, 32)))
    datasets = build_datasets(DataConfig(), cifar_small, resolved)
    assert datasets.classes == list(CIFAR10_CLASSES) and datasets.num_classes == 10
    assert len(datasets.train) == len(datasets.val) == 300
    assert collections.Counter(datasets.train.targets) == {label: 30 for label in range(10)}
    assert datasets.val.root == cifar_small / "test"
    assert datasets.train.samples[0] == (str(cifar_small / "train/airplane/0000.jpg"), 0)
    assert datasets.val.samples[-1] == (str(cifar_small / "test/truck/0029.jpg"), 9)
    image, label = datasets.val[45]
    assert label == 1 and image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_folder_images_are_rgb_in_channel_order(cifar_small: Path) -> None:
    plain = ResolvedData((3, 32, 32), (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0, "none")
    datasets = build_datasets(DataConfig(), cifar_small, plain)
    mean = torch.stack([datasets.train[i][0] for i in range(0, 300, 3)]).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.04)  # the published RGB means
    assert mean[0] > mean[2]


def test_folder_prefers_val_and_obeys_val_split(tmp_path: Path) -> None:
    make_tree(tmp_path, {**TREE, "val": {"cat": 1, "dog": 1}})
    assert len(build_datasets(DataConfig(), tmp_path, SMALL).val) == 2
    assert len(build_datasets(DataConfig(val_split="test"), tmp_path, SMALL).val) == 4


def test_folder_skips_hidden_folders_and_other_files(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    (tmp_path / "train/.ipynb_checkpoints").mkdir()
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    (tmp_path / "train/cat/.hidden.png").write_bytes(b"")
    Image.new("RGB", (5, 5)).save(tmp_path / "train/cat/UPPER.JPG")
    datasets = build_datasets(DataConfig(), tmp_path, SMALL)
    assert datasets.classes == ["cat", "dog"] and len(datasets.train) == 9


def test_folder_decodes_grayscale_for_one_channel(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    gray = ResolvedData((1, 8, 8), (0.5,), (0.5,), "bilinear", 1.0, "cifar")
    assert build_datasets(DataConfig(), tmp_path, gray).train[0][0].shape == (1, 8, 8)


def data_error(cfg: DataConfig, root: Path | None) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(cfg, root, SMALL)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_root(tmp_path: Path) -> None:
    assert (
        data_error(DataConfig(), tmp_path / "nope")
        == f"data directory {tmp_path / 'nope'} does not exist: check the path"
    )
    assert "no data directory given" in data_error(DataConfig(), None)
    (tmp_path / "file").write_text("")
    assert "is not a directory" in data_error(DataConfig(), tmp_path / "file")


def test_error_no_train_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, {"test": TREE["test"]})
    message = data_error(DataConfig(), tmp_path)
    assert message.startswith(f"no train folder in {tmp_path}: an image folder holds train/")
    assert "did you mean" not in message
    make_tree(tmp_path / "cifar10", TREE)
    assert data_error(DataConfig(), tmp_path).endswith(f"; did you mean {tmp_path / 'cifar10'}?")


def test_error_no_val_or_test_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": TREE["train"]})
    message = data_error(DataConfig(), tmp_path)
    assert message.startswith(f"no validation folder in {tmp_path}: add val/<class>/<image> (or test/<class>/<image>)")
    assert "data.val_split" in message
    message = data_error(DataConfig(val_split="holdout"), tmp_path)
    assert f"validation folder {tmp_path / 'holdout'} (data.val_split) does not exist" in message
    assert "folders in" in message and "train" in message


def test_error_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert data_error(DataConfig(), tmp_path).startswith(f"{tmp_path / 'train'} has no class folders: put each class")


def test_error_class_folder_without_images(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    for split in ("train", "test"):
        (tmp_path / split / "emu").mkdir()
    (tmp_path / "train/emu/readme.txt").write_text("")
    message = data_error(DataConfig(), tmp_path)
    assert message.startswith(f"1 class folder(s) in {tmp_path / 'train'} have no images (.jpg, .jpeg, .png")
    assert message.endswith(": emu; add images or remove the folder(s)")


def test_error_class_folders_differ(tmp_path: Path) -> None:
    make_tree(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "d": 1, "e": 1}})
    message = data_error(DataConfig(), tmp_path)
    assert message == (
        f"class folders differ between {tmp_path / 'train'} and {tmp_path / 'val'} "
        "(only in train: c; only in val: d, e): both splits need the same class folders"
    )


def test_error_cifar_not_downloaded(tmp_path: Path) -> None:
    message = data_error(DataConfig(dataset="cifar10"), tmp_path)
    assert message.startswith(f"CIFAR-10 not found in {tmp_path}") and "set data.download: true" in message


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_image_that_does_not_decode(tmp_path: Path, workers: int, damage: str) -> None:
    make_tree(tmp_path, TREE, size=(64, 64))
    bad = tmp_path / "train/dog/002.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not a JPEG")
    else:
        random_image(64, 64).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[:600])
    datasets = build_datasets(DataConfig(), tmp_path, SMALL)
    loaders = build_loaders(datasets, 3, DataConfig(workers=workers), seed=0)
    before = set(multiprocessing.active_children())
    with pytest.raises(DataError) as info:
        list(loaders.train)
    assert set(multiprocessing.active_children()) <= before  # the workers stopped at once
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad} (") and message.endswith("): replace or delete the file")
    assert "\n" not in message and "Traceback" not in message
    with pytest.raises(DataError) as again:  # the loader stopped its workers and starts afresh
        list(loaders.train)
    assert str(again.value) == message


# --------------------------------------------------------------------------- build_loaders


def test_epoch_is_a_pure_function_of_seed_and_epoch() -> None:
    cfg = DataConfig(workers=0)
    first, resumed = build_loaders(noisy(), 4, cfg, seed=7), build_loaders(noisy(), 4, cfg, seed=7)
    epoch0 = epoch_batches(first, 0)
    epoch1 = epoch_batches(first, 1)
    assert_same(epoch_batches(resumed, 1), epoch1)  # without having run epoch 0
    assert_same(epoch_batches(resumed, 0), epoch0)
    order = [x[:, 0].tolist() for x, _ in epoch0]
    assert order != [x[:, 0].tolist() for x, _ in epoch1]  # another order
    assert sorted(sum(order, [])) == list(range(40))
    assert not torch.equal(epoch0[0][0], epoch_batches(build_loaders(noisy(), 4, cfg, seed=8), 0)[0][0])


def test_resume_mid_epoch_gives_the_remaining_batches() -> None:
    loaders = build_loaders(noisy(), 4, DataConfig(workers=0), seed=3)
    full = epoch_batches(loaders, 2)
    resumed = build_loaders(noisy(), 4, DataConfig(workers=0), seed=3)
    rest = epoch_batches(resumed, 2, start_batch=3)
    assert len(loaders.train) == 10 and len(resumed.train) == 7
    assert_same(rest, full[3:])


def test_loading_does_not_touch_the_global_rng() -> None:
    loaders = build_loaders(noisy(), 4, DataConfig(workers=0), seed=0)
    state = torch.get_rng_state()
    epoch_batches(loaders, 0)
    list(loaders.val)
    assert torch.equal(torch.get_rng_state(), state)


def test_workers_give_the_batches_of_the_main_process(cifar_small: Path) -> None:
    resolved = resolve_data_config(DataConfig(input_size=(3, 32, 32)))
    datasets = build_datasets(DataConfig(), cifar_small, resolved)
    inline = build_loaders(datasets, 16, DataConfig(workers=0), seed=5, limit_train=64)
    workers = build_loaders(datasets, 16, DataConfig(workers=2), seed=5, limit_train=64)
    assert_same(epoch_batches(workers, 0), epoch_batches(inline, 0))
    assert_same(epoch_batches(workers, 1), epoch_batches(inline, 1))  # persistent workers see the new epoch
    workers.close()
    assert_same(epoch_batches(workers, 1), epoch_batches(inline, 1))  # new workers after close()


def test_loader_datasets_pickle_for_spawned_workers(cifar_small: Path) -> None:
    datasets = build_datasets(DataConfig(), cifar_small, resolve_data_config(DataConfig(input_size=(3, 32, 32))))
    dataset = build_loaders(datasets, 8, DataConfig(workers=0), seed=0).train.dataset
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[(17, 3)][0], dataset[(17, 3)][0])


def test_train_drops_the_last_batch_and_val_keeps_order() -> None:
    loaders = build_loaders(noisy(n=42, n_val=10), 4, DataConfig(workers=0), seed=0)
    assert len(loaders.train) == 10 and all(len(x) == 4 for x, _ in loaders.train)
    val = list(loaders.val)
    assert [len(x) for x, _ in val] == [4, 4, 2]
    assert torch.cat([x[:, 0] for x, _ in val]).tolist() == list(range(10))


def test_limit_train_draws_a_stratified_subset() -> None:
    loaders = build_loaders(noisy(n=40), 2, DataConfig(workers=0), seed=4, limit_train=8)
    seen = sorted(int(i) for x, _ in epoch_batches(loaders, 0) for i in x[:, 0])
    assert seen == stratified_subset(Noisy(40).targets, 8, seed=4)
    assert len(loaders.train) == 4


def test_distributed_shards_are_disjoint() -> None:
    cfg = DataConfig(workers=0)
    shards = [
        build_loaders(noisy(n=41, n_val=10), 2, cfg, seed=1, distributed=True, rank=r, world_size=3) for r in range(3)
    ]
    train = [[int(i) for x, _ in epoch_batches(s, 5) for i in x[:, 0]] for s in shards]
    assert [len(t) for t in train] == [12, 12, 12]  # 41 // 3 = 13 per rank, 6 full batches of 2
    assert len(set(sum(train, []))) == 36
    sampled = [s.train.sampler.shard() for s in shards]
    assert sorted(sum(sampled, [])) == sorted(set(sum(sampled, []))) and len(sum(sampled, [])) == 39
    val = [[int(i) for x, _ in s.val for i in x[:, 0]] for s in shards]
    assert val == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # every image exactly once, none padded


def test_epoch_sampler_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        EpochSampler(range(4), seed=0, shuffle=True, rank=2, world_size=2)


def test_loader_options() -> None:
    cpu = build_loaders(noisy(), 4, DataConfig(workers=0), seed=0)
    assert not cpu.train.pin_memory and not cpu.train.persistent_workers and cpu.train.drop_last
    assert not cpu.val.drop_last
    cuda = build_loaders(noisy(), 4, DataConfig(workers=2), seed=0, device_type="cuda")
    assert cuda.train.pin_memory and cuda.val.persistent_workers
    assert not build_loaders(noisy(), 4, DataConfig(pin_memory=False), seed=0, device_type="cuda").train.pin_memory


def test_too_few_images_for_a_batch() -> None:
    with pytest.raises(DataError, match=r"^the train set has 10 image\(s\), fewer than one batch of 16: lower"):
        build_loaders(noisy(n=10), 16, DataConfig(workers=0), seed=0)
    with pytest.raises(DataError, match=r"has 5 image\(s\) per process \(2 processes\)"):
        build_loaders(noisy(n=10), 8, DataConfig(workers=0), seed=0, distributed=True, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        build_loaders(noisy(), 0, DataConfig(workers=0), seed=0)


# --------------------------------------------------------------------------- the evaluation split alone


def test_eval_dataset_reads_only_the_evaluation_split(tmp_path: Path) -> None:
    make_tree(tmp_path, {"test": TREE["test"]})  # no train/ folder
    dataset = build_eval_dataset(DataConfig(), tmp_path, SMALL)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4 and dataset.targets == [0, 0, 1, 1]
    image, label = dataset[2]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.equal(image, build_transforms(SMALL, train=False)(Image.open(tmp_path / "test/dog/000.png")))
    make_tree(tmp_path, {"val": {"cat": 1, "dog": 1}})  # val/ is preferred, as for training
    assert len(build_eval_dataset(DataConfig(), tmp_path, SMALL, classes=["cat", "dog"])) == 2
    make_tree(tmp_path, {"holdout": {"cat": 3, "dog": 3}})
    assert len(build_eval_dataset(DataConfig(val_split="holdout"), tmp_path, SMALL)) == 6


def test_eval_dataset_errors(tmp_path: Path) -> None:
    make_tree(tmp_path, {"val": {"cat": 1, "dog": 1, "emu": 1}})
    with pytest.raises(DataError) as info:
        build_eval_dataset(DataConfig(), tmp_path, SMALL, classes=["cat", "dog", "fox"])
    assert str(info.value) == (
        f"the class folders of {tmp_path / 'val'} differ from those the model was trained on (3 classes; "
        "only in the model: fox; only in val: emu): evaluate on a split with the same classes"
    )
    with pytest.raises(DataError, match=r"^no validation folder in .*: add val/<class>/<image>"):
        build_eval_dataset(DataConfig(), tmp_path / "val", SMALL)
    with pytest.raises(DataError, match=r"^data directory .*nope does not exist"):
        build_eval_dataset(DataConfig(), tmp_path / "nope", SMALL)
    with pytest.raises(DataError, match=r"^no data directory given: pass the directory that holds ROOT/val/"):
        build_eval_dataset(DataConfig(), None, SMALL)


def test_eval_loader_gives_the_batches_of_the_validation_loader(cifar_small: Path) -> None:
    resolved = resolve_data_config(DataConfig(input_size=(3, 32, 32)))
    datasets = build_datasets(DataConfig(), cifar_small, resolved)
    val = build_eval_dataset(DataConfig(), cifar_small, resolved)
    for limit in (None, 50):
        run = build_loaders(datasets, 16, DataConfig(workers=0), seed=9, limit_val=limit)
        alone = build_eval_loader(val, 16, workers=2, limit=limit)
        assert_same(list(alone), list(run.val))
        alone.close()
    assert len(list(alone)) == 4  # 50 images, the last batch kept


# --------------------------------------------------------------------------- limits


def test_limit_val_draws_the_same_balanced_subset_whatever_the_seed() -> None:
    first = build_loaders(noisy(n=40, n_val=20), 4, DataConfig(workers=0), seed=1, limit_val=8)
    other = build_loaders(noisy(n=40, n_val=20), 4, DataConfig(workers=0), seed=2, limit_val=8)
    seen = [int(i) for x, _ in first.val for i in x[:, 0]]
    assert seen == [int(i) for x, _ in other.val for i in x[:, 0]]
    assert seen == stratified_subset(Noisy(20).targets, 8, seed=VAL_SUBSET_SEED)
    assert collections.Counter(i % 4 for i in seen) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len(first.train) == 10  # the train split is untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit_train": 41}, r"^limit_train: 41 is more than the 40 images of the train split; lower it"),
        ({"limit_val": 11}, r"^limit_val: 11 is more than the 10 images of the validation split; lower it"),
        ({"limit_val": 0}, r"^limit_val: must be at least 1 image, got 0"),
        ({"limit_train": 0}, r"^limit_train: must be at least 1 image, got 0"),
    ],
)
def test_limits_outside_the_split_are_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_loaders(noisy(), 4, DataConfig(workers=0), seed=0, **kwargs)
    limit = {"limit_train": 40, "limit_val": 10}
    assert len(build_loaders(noisy(), 4, DataConfig(workers=0), seed=0, **limit).train) == 10  # all is fine


def test_the_zoo_and_the_data_pipeline_share_one_pair_of_statistics() -> None:
    from binarize.data import constants
    from binarize.zoo import cifar

    assert cifar.CIFAR_MEAN is constants.IMAGENET_MEAN is IMAGENET_MEAN
    assert cifar.CIFAR_STD is constants.IMAGENET_STD is IMAGENET_STD
    assert cifar.cifar_resnet20().pretrained_cfg["mean"] == IMAGENET_MEAN
