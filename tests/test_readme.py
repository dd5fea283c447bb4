"""The README's Python example runs as written, with its placeholder files replaced by real ones: the
pretrained CIFAR-10 ResNet-20 of ../shared/models and a small extract of the CIFAR-10 image folders, and
the recipe shortened to a few steps."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _shared_data import SHARED, extract_cifar10

README = Path(__file__).resolve().parents[1] / "README.md"
CHECKPOINT = SHARED / "models" / "cifar10-resnet20-12fca82f.th"


def python_example() -> str:
    """The first python block after the "## Python API" heading."""
    section = README.read_text().split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"shared checkpoint not found: {CHECKPOINT}")
def test_the_python_example_runs(tmp_path, monkeypatch):
    data = extract_cifar10(tmp_path / "data", per_class=12)
    code = python_example()
    overrides = ["epochs=1", "batch_size=16", "train.limit_train=64", "data.workers=0"]
    short = f'binarize.load_recipe("cifar10-resnet20-posthoc", {overrides!r})'
    for placeholder, real in (
        ('"resnet20-float.th"', repr(str(CHECKPOINT))),
        ('"cifar10-resnet20-posthoc"', short),
        ('"cifar10"', repr(str(data))),
    ):
        assert placeholder in code, f"the README example no longer uses {placeholder}"
        code = code.replace(placeholder, real)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the documented example itself
    for name in ("resnet20-binary.safetensors", "runs/r20/best.safetensors", "r20.packed.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "r20.packed.safetensors").stat().st_size < (
        tmp_path / "resnet20-binary.safetensors"
    ).stat().st_size / 10
