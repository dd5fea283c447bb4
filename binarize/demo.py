"""The main job on an embedded example, fully offline: train a float CNN, binarize it, fine-tune it.

The data is scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes; UCI
"Optical Recognition of Handwritten Digits"), which ships inside the installed package. The float
model is trained here; conversion, BatchNorm re-estimation, distillation from the float model and
the tau schedule all go through binarize's engine, exactly as a user's fine-tune does. Then the
binary model is exported to a packed 1-bit file, loaded back and run with the native kernels: its
accuracy, its size on disk and its latency are measured against the float CNN's.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from binarize.conversion.policy import Policy
from binarize.conversion.report import inspect
from binarize.data import DataConfig
from binarize.deploy import export
from binarize.deploy.timing import time_interleaved
from binarize.engine import evaluate, finetune
from binarize.engine.progress import Reporter
from binarize.errors import ConfigError
from binarize.files import load, save
from binarize.nn import kernel_info
from binarize.recipes import DistillConfig, OptimizerConfig, Recipe, ScheduleConfig, StageConfig, TrainConfig

__all__ = ["DemoResult", "DigitsCNN", "check_demo_options", "digits_datasets", "run_demo"]


class TensorImages(Dataset):
    """Images and labels held in memory, with the ``classes`` / ``targets`` the engine reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        self.images, self.labels, self.classes = images, labels, classes
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def digits_datasets(seed: int = 0, val_fraction: float = 0.25) -> tuple[TensorImages, TensorImages]:
    """scikit-learn's digits as 1x8x8 tensors in [-1, 1], split per class into train and validation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = int(round(len(idx) * val_fraction))
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    classes = [str(c) for c in range(10)]
    train = TensorImages(images[sorted(train_idx)], labels[sorted(train_idx)], classes)
    val = TensorImages(images[sorted(val_idx)], labels[sorted(val_idx)], classes)
    return train, val


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: a float stem, three convs that become binary, a float head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _train_float(model: nn.Module, train: TensorImages, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@dataclasses.dataclass
class DemoResult:
    """Accuracies (percent), file sizes on disk (bytes) and latencies of the demo, and how long it took.

    Attributes:
        float_top1: The float CNN's validation top-1.
        converted_top1: The binary model's, right after conversion and BatchNorm re-estimation.
        finetuned_top1: The binary model's after fine-tuning (simulated: float tensors holding +-1).
        packed_top1: The packed file's, loaded back and run with the native 1-bit kernels.
        fp32_bytes: The float CNN's weights as a float32 safetensors file.
        packed_bytes: The packed file.
        binary_convs: Binary convolutions.
        float_ms: The float CNN's latency for one image (median over interleaved rounds, this CPU).
        packed_ms: The packed model's latency for one image.
        kernel: The native kernel that ran (``kernel_info()["active"]``).
        seconds: The demo's wall time.
    """

    float_top1: float
    converted_top1: float
    finetuned_top1: float
    packed_top1: float
    fp32_bytes: int
    packed_bytes: int
    binary_convs: int
    float_ms: float
    packed_ms: float
    kernel: str
    seconds: float


def demo_recipe(epochs: int = 8, seed: int = 0) -> Recipe:
    """The demo's recipe: distil the float model into its binary copy with Adam and a cosine schedule."""
    stage = StageConfig(
        name="demo",
        epochs=epochs,
        batch_size=64,
        optimizer=OptimizerConfig(name="adam", lr=5e-3),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1),
        distill=DistillConfig(teacher="float", alpha=0.5),
    )
    return Recipe(
        name="demo",
        description="binarize demo on scikit-learn's digits",
        policy=Policy(shortcuts="bireal"),
        data=DataConfig(workers=0),
        stages=(stage,),
        train=TrainConfig(seed=seed, device="cpu", bn_calibration_batches=20, log_every=10),
    )


def check_demo_options(float_epochs: int, binary_epochs: int, output_dir: str | Path | None) -> None:
    """Checks the demo's settings before any training: positive epoch counts, and an output directory that
    is new or empty (the demo starts a new run every time; it cannot continue one).

    Raises:
        ConfigError: A setting the demo cannot run with, named in the message.
    """
    for name, value in (("float_epochs", float_epochs), ("binary_epochs", binary_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: the demo trains for at least 1 epoch, got {value!r}")
    if output_dir is None:
        return
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {path} is a file; the demo writes a run directory")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"output_dir: {path} is not empty; the demo starts a new run every time (it cannot continue one): "
            "give a new or empty directory"
        )


def run_demo(
    seed: int = 0,
    float_epochs: int = 10,
    binary_epochs: int = 8,
    output_dir: str | Path | None = None,
    reporter: Reporter | None = None,
) -> DemoResult:
    """Trains the float CNN, converts it, fine-tunes the binary model and measures every step.

    Raises:
        ConfigError: Settings the demo cannot run with (:func:`check_demo_options`), before any training.
    """
    check_demo_options(float_epochs, binary_epochs, output_dir)
    start = time.perf_counter()
    train, val = digits_datasets(seed)
    torch.manual_seed(seed)  # the float model's initialisation too, so that a seed fixes every figure
    float_model = DigitsCNN()
    _train_float(float_model, train, float_epochs, seed)
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)
    float_top1 = evaluate(float_model, val_loader, torch.device("cpu"))["top1"]
    result = finetune(
        float_model,
        demo_recipe(binary_epochs, seed),
        train_data=train,
        val_data=val,
        output_dir=output_dir,
        reporter=reporter or Reporter(),
    )
    with tempfile.TemporaryDirectory() as scratch:
        files = Path(output_dir) if output_dir is not None else Path(scratch)
        files.mkdir(parents=True, exist_ok=True)
        float_file = files / "float.safetensors"
        save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(float_file))
        save(result.model, files / "binary.safetensors", force=True)
        packed_file = export(result.model, files / "binary.packed.safetensors", force=True)
        packed = load(packed_file, model=DigitsCNN())  # a model of this code: the file records no source
        packed_top1 = evaluate(packed, val_loader, torch.device("cpu"))["top1"]
        fp32_bytes, packed_bytes = float_file.stat().st_size, packed_file.stat().st_size
    image = val[0][0].unsqueeze(0)
    with torch.no_grad():
        times = time_interleaved({"float": lambda: float_model(image), "packed": lambda: packed(image)}, rounds=5)
    return DemoResult(
        float_top1=float_top1,
        converted_top1=result.history[0]["val_top1"],
        finetuned_top1=result.history[-1]["val_top1"],
        packed_top1=packed_top1,
        fp32_bytes=fp32_bytes,
        packed_bytes=packed_bytes,
        binary_convs=inspect(result.model).summary.binary_convs,
        float_ms=1e3 * statistics.median(times["float"]),
        packed_ms=1e3 * statistics.median(times["packed"]),
        kernel=kernel_info()["active"],
        seconds=time.perf_counter() - start,
    )
