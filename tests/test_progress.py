"""Tests of what a run shows and draws: reporters on and off a terminal, the learning-rate curve, curves.png.

Logs written to a file or pipe must be whole lines (no wrapping, no split tokens) with a progress
line during long epochs; drawing the curves must not touch the process's matplotlib state; and
``import binarize`` imports neither rich nor matplotlib.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import binarize
from binarize.cli.main import app
from binarize.engine import loop
from binarize.engine.progress import PlainReporter, Reporter, RichReporter, default_reporter, epoch_line
from binarize.engine.records import curves_figure, plot_curves
from binarize.engine.schedules import lr_at, lr_curve
from binarize.recipes import OptimizerConfig, ScheduleConfig, StageConfig

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD = {
    "epoch": 12,
    "stage": "binary-weights",
    "tau": 0.91234,
    "lr": 1.234e-3,
    "train_loss": 1.23456,
    "val_loss": 0.98765,
    "val_top1": 75.1111,
    "val_top5": 93.4567,
    "val_images": 10000,
    "images_per_s": 12345.6,
    "seconds": 81.0,
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- reporters


def test_plain_reporter_writes_whole_lines_and_a_progress_line_every_interval():
    stream, clock = io.StringIO(), Clock()
    reporter = PlainReporter(stream, interval=30.0, clock=clock)
    reporter.message("resuming runs/a-run-directory-with-a-rather-long-name/layer1.0.conv1 at stage 2, epoch 3")
    reporter.start_epoch(3, 200, 390, "binary-weights")
    for done, now in ((20, 10.0), (40, 29.9), (60, 30.0), (80, 45.0), (100, 61.0), (390, 200.0)):
        clock.now = now
        reporter.step(done, 1.5 + done / 1000, 2345.6)
    reporter.end_epoch(RECORD)
    reporter.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "resuming runs/a-run-directory-with-a-rather-long-name/layer1.0.conv1 at stage 2, epoch 3",
        "binary-weights epoch 3/200  step 60/390  loss 1.5600  2,346 img/s  elapsed 0:00:30",
        "binary-weights epoch 3/200  step 100/390  loss 1.6000  2,346 img/s  elapsed 0:01:01",
        epoch_line(RECORD),
    ]
    assert len(lines[-1]) > 80  # one line however long
    assert lines[-1] == (
        "epoch 12  tau 0.9123  lr 1.23e-03  train_loss 1.2346  val_loss 0.9877  val_top1 75.11%  val_top5 93.46%  "
        "val_images 10000  12,346 img/s"
    )


def test_plain_reporter_every_steps():
    stream, clock = io.StringIO(), Clock()
    reporter = PlainReporter(stream, interval=1e9, every_steps=40, clock=clock)
    reporter.start_epoch(1, 1, 100, "main")
    for done in (20, 40, 60, 80, 100):
        reporter.step(done, 1.0, 10.0)
    assert [re.search(r"step (\d+)/", line).group(1) for line in stream.getvalue().splitlines()] == ["40", "80"]


def test_the_default_reporter_follows_the_stream():
    assert type(default_reporter(io.StringIO())) is PlainReporter
    terminal = Terminal()
    reporter = default_reporter(terminal)
    assert type(reporter) is RichReporter
    reporter.message("hello")
    assert "hello" in terminal.getvalue()


def test_a_run_logs_progress_lines_to_a_stream(tiny_recipe, tiny_data):
    stream = io.StringIO()
    binarize.finetune(None, tiny_recipe("epochs=1"), data_dir=tiny_data, reporter=PlainReporter(stream, interval=0))
    lines = stream.getvalue().splitlines()
    # 6 steps, the loss read every 2: progress lines at steps 2 and 4; the epoch's summary after step 6
    assert [line.split("  loss")[0] for line in lines if "step" in line] == [
        "main epoch 1/1  step 2/6",
        "main epoch 1/1  step 4/6",
    ]
    assert re.fullmatch(r"main epoch 1/1  step 2/6  loss \d\.\d{4}  [\d,]+ img/s  elapsed 0:00:\d\d", lines[1])
    assert lines[0].startswith("epoch 0  tau 0.8500  lr 0.00e+00  val_loss ") and lines[0].endswith("val_images 18")
    assert lines[-1].startswith("epoch 1  tau 0.8500  lr ") and "val_top5" in lines[-1] and "img/s" in lines[-1]


def test_the_cli_logs_whole_lines_when_stderr_is_not_a_terminal(tiny_recipe_file, tiny_data, tmp_path):
    result = CliRunner().invoke(
        app, ["finetune", "--recipe", str(tiny_recipe_file), "--data", str(tiny_data), "-o", str(tmp_path / "run"),
              "--epochs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    epochs = [line for line in result.stderr.splitlines() if re.match(r"epoch \d ", line)]
    assert len(epochs) == 2, result.stderr
    for line in epochs:  # each epoch on one line, nothing wrapped or split
        assert re.search(r"val_top1 [\d.]+%  val_top5 [\d.]+%  val_images 18", line), line


# --------------------------------------------------------------------------- the learning-rate curve


def test_lr_curve_is_the_schedule_at_every_step():
    stages = [
        StageConfig(epochs=2, optimizer=OptimizerConfig(lr=0.01), schedule=ScheduleConfig(warmup_epochs=0.5)),
        StageConfig(epochs=1, optimizer=OptimizerConfig(lr=0.1), schedule=ScheduleConfig(name="step", milestones=(1,))),
    ]
    points = lr_curve(stages, [10, 4])
    first = [lr_at(s, 10, 2, 0.01, stages[0].schedule) for s in range(20)]
    assert points[:20] == [(s / 10, lr) for s, lr in enumerate(first)]
    assert points[20:] == [(2 + s / 4, pytest.approx(0.1)) for s in range(4)]
    assert max(lr for _, lr in points[:20]) == pytest.approx(0.01)  # the peak after warm-up
    # a long stage is drawn at fewer points, its boundaries kept
    long = lr_curve([StageConfig(epochs=600, schedule=ScheduleConfig(warmup_epochs=5))], [390], max_points=1000)
    assert len(long) <= 1000 + 4
    xs = [x for x, _ in long]
    assert xs == sorted(xs) and xs[0] == 0 and xs[-1] == pytest.approx(600 - 1 / 390)
    assert 5 - 1 / 390 in xs and 5.0 in xs  # the last warm-up step and the first cosine step
    assert max(lr for _, lr in long) == pytest.approx(1e-3)


def test_curves_show_the_lr_per_step_integer_epochs_and_a_title():
    stage = StageConfig(epochs=1, optimizer=OptimizerConfig(lr=1e-2), schedule=ScheduleConfig(warmup_epochs=0.5))
    curve = lr_curve([stage], [100])
    records = [
        {**RECORD, "epoch": 0, "lr": 0.0, "train_loss": None, "images_per_s": None, "seconds": None},
        {**RECORD, "epoch": 1, "lr": lr_at(99, 100, 1, 1e-2, stage.schedule)},
    ]
    assert records[1]["lr"] < 2e-4  # at the epoch end, the rate is almost back at zero
    fig = curves_figure(records, curve, "cifar10-resnet20-posthoc: r20")
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    (line,) = axes["learning rate"].get_lines()
    assert max(line.get_ydata()) == pytest.approx(1e-2)  # the peak is drawn
    assert fig.get_suptitle() == "cifar10-resnet20-posthoc: r20"
    for ax in fig.axes:
        ticks = [t for t in ax.xaxis.get_major_locator().tick_values(0, 1) if 0 <= t <= 1]
        assert all(float(t).is_integer() for t in ticks)


def test_a_run_draws_the_curves_with_its_name(tiny_recipe, tiny_data, tmp_path, monkeypatch):
    calls = []
    real_plot = loop.plot_curves

    def plot_curves(records, path, **kwargs):
        calls.append(kwargs)
        return real_plot(records, path, **kwargs)

    monkeypatch.setattr(loop, "plot_curves", plot_curves)
    recipe = tiny_recipe("epochs=1", "train.limit_train=32", "schedule.name=cosine")  # 4 steps: 2 warm-up, 2 cosine
    result = binarize.finetune(None, recipe, data_dir=tiny_data, output_dir=tmp_path / "r20", reporter=Reporter())
    (kwargs,) = calls
    assert kwargs["title"] == "tiny: r20"
    assert [lr for _, lr in kwargs["lr_curve"]] == pytest.approx([2.5e-3, 5e-3, 5e-3, 2.5e-3])
    assert result.history[-1]["lr"] == pytest.approx(2.5e-3)  # the epoch-end value alone misses the peak
    pytest.importorskip("matplotlib")
    assert (tmp_path / "r20" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- no process-wide side effects

_CURVES_PROBE = r"""
import json, sys
from pathlib import Path
import matplotlib
before = dict.__getitem__(matplotlib.rcParams, "backend")
used = []
matplotlib.use = lambda *a, **k: used.append(a)
from binarize.engine.records import plot_curves
ok = plot_curves([{"epoch": 0, "lr": 0.0, "tau": 0.85, "val_loss": 1.0, "val_top1": 10.0, "val_top5": 50.0}],
                 Path(sys.argv[1]), lr_curve=[(0.0, 0.1), (0.5, 0.2)], title="t")
print(json.dumps({"ok": ok, "used": used, "pyplot": "matplotlib.pyplot" in sys.modules,
                  "backend_kept": dict.__getitem__(matplotlib.rcParams, "backend") == before}))
"""


def test_plot_curves_leaves_matplotlib_alone(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    done = subprocess.run(
        [sys.executable, "-c", _CURVES_PROBE, str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"ok": True, "used": [], "pyplot": False, "backend_kept": True}
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_import_binarize_imports_neither_rich_nor_matplotlib():
    code = "import binarize, sys; sys.exit(sorted(m for m in ('rich', 'matplotlib') if m in sys.modules) or 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_nan_values_are_drawn_as_gaps():
    records = [{"epoch": 0, "train_loss": None, "val_loss": 1.0}, {"epoch": 1, "train_loss": 2.0, "val_loss": 0.5}]
    fig = curves_figure(records)
    loss_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "loss")
    train = next(line for line in loss_ax.get_lines() if line.get_label() == "train_loss")
    assert math.isnan(train.get_ydata()[0]) and train.get_ydata()[1] == 2.0


def test_plot_curves_writes_the_file_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert plot_curves([{"epoch": 0, "val_loss": 1.0}], path) is True
    assert path.is_file() and not list(Path(tmp_path).glob("*.tmp"))
