"""docs/finetune.md's "Your own training loop" example runs as it is: its code block is extracted and executed
(a small CNN on random images, a few seconds), then tau is checked against ReCU's schedule, epoch by epoch."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from binarize.diagnostics import RECORD_KEYS, read_history
from binarize.nn import ReCUConv2d

DOC = Path(__file__).resolve().parents[1] / "docs" / "finetune.md"
SECTION = "\n## Your own training loop\n"


def python_blocks() -> list[str]:
    """The python code blocks of the section "Your own training loop", in order."""
    text = DOC.read_text()
    assert SECTION in text, f"no section 'Your own training loop' in {DOC}"
    text = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, f"no python code block in {DOC}"
    return blocks


def example_code() -> str:
    """The complete example: the first block."""
    return python_blocks()[0]


def schedule(t: float, epochs: int, tau_min: float = 0.85, tau_max: float = 0.99) -> float:
    """ReCU eq. 24, written out: tau(t) = A e^(t/T) + B with tau(0) = tau_min and tau(T) = tau_max."""
    a = (tau_max - tau_min) / (math.e - 1)
    return a * math.exp(t / epochs) + tau_min - a


def f32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_the_example_runs_follows_the_schedule_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "own_loop_example"}
    exec(compile(example_code(), str(DOC), "exec"), namespace)  # noqa: S102 - the documented example itself
    epochs = namespace["epochs"]
    assert epochs >= 2
    run_dir = tmp_path / "runs" / "own-loop"

    # After the last epoch the scheduler has stepped `epochs` times: t = T, tau = tau_max, on every layer.
    scheduler, model = namespace["scheduler"], namespace["model"]
    assert scheduler.tau == pytest.approx(schedule(epochs, epochs), abs=1e-15) == pytest.approx(0.99)
    layers = [m for m in model.modules() if isinstance(m, ReCUConv2d)]
    assert len(layers) == 2 and all(m.tau.item() == f32(scheduler.tau) for m in layers)

    # Epoch e (1-based) trained, and was diagnosed, at tau(e - 1); epoch 0 at tau(0).
    history = read_history(run_dir)
    assert history.epochs == list(range(epochs + 1))
    for name, records in history.layers.items():
        for record in records:
            assert list(record) == list(RECORD_KEYS)
            tau = schedule(max(record["epoch"] - 1, 0), epochs)
            assert record["clipped_nominal"] == pytest.approx(2 * (1 - f32(tau)), abs=1e-12), (name, record["epoch"])
            assert record["saturation"] is not None
        assert records[0]["flip_rate"] is None and records[0]["changed_from_start"] == 0.0
        assert all(r["flip_rate"] is not None for r in records[1:])

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == epochs and state["tau_scheduler"]["count"] == epochs
    assert state["sign_tracker"]["snapshots"] == epochs + 1
    assert (run_dir / "diagnostics.png").is_file() and (run_dir / "weights.png").is_file()

    # The "Resuming" block restores tau on every layer and the tracker exactly.
    resume = next(b for b in python_blocks() if "trim_history" in b)
    snapshots = namespace["tracker"].snapshots
    for m in layers:
        m.tau.fill_(0.5)
    exec(compile(resume, str(DOC), "exec"), namespace)  # noqa: S102
    assert namespace["scheduler"] is not scheduler and namespace["scheduler"].tau == scheduler.tau
    assert all(m.tau.item() == f32(scheduler.tau) for m in layers)
    assert namespace["tracker"].snapshots == snapshots
    assert namespace["tracker"].state_dict()["layers"].keys() == state["sign_tracker"]["layers"].keys()
    assert read_history(run_dir).epochs == list(range(epochs + 1))
