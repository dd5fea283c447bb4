"""The run directory's rules: what may be started or resumed where, the recipe written beside a run.

* A directory that holds any file of a run (:data:`RUN_FILES`) is refused for a new run: nothing is
  overwritten silently; ``--resume`` continues it (it needs ``state.pt``).
* The path is checked before any work: it must be (or be creatable as) a directory that can be
  written to. The directory itself is created only when the run writes its first file (after
  epoch 0), so a run that fails earlier (no data, bad data, Ctrl-C) leaves nothing behind.
* A resumed run follows the recipe it started with (:func:`check_same_recipe`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from binarize.diagnostics.history import DIAGNOSTICS
from binarize.engine import checkpoint as ckpt
from binarize.engine.distributed import DistContext
from binarize.engine.records import METRICS
from binarize.errors import ConfigError, TrainingError
from binarize.files import atomic_write
from binarize.recipes import Recipe, dump_recipe

__all__ = ["RECIPE_FILE", "RUN_FILES", "prepare_run_dir", "create_run_dir", "check_same_recipe", "write_recipe"]

RECIPE_FILE = "recipe.yaml"
RUN_FILES = (ckpt.STATE, ckpt.LAST, ckpt.BEST, ckpt.INTERRUPTED, METRICS, RECIPE_FILE, DIAGNOSTICS)
"""The files a run writes; any of them marks a directory as holding a run."""


def prepare_run_dir(output_dir: str | Path | None, resume: bool, ctx: DistContext) -> Path | None:
    """Checks where a run may write, creating nothing; every process checks, then they wait for each other.

    Args:
        output_dir: The run directory, or None for a run without files.
        resume: The run continues the one in ``output_dir``.
        ctx: This process's place in the job.

    Returns:
        The run directory, or None.

    Raises:
        ConfigError: The path is a file, lies under a file, or cannot be created or written.
        TrainingError: A new run into a directory that holds one, or nothing to resume.
    """
    if output_dir is None:
        if resume:
            raise ConfigError("--resume needs the --output directory of the run to continue")
        return None
    run_dir = Path(output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output {run_dir} is a file, not a directory: choose another --output")
    ours = [n for n in RUN_FILES if (run_dir / n).exists()]
    if not resume and ours:
        raise TrainingError(
            f"{run_dir} already holds a run ({', '.join(ours)}); "
            "pass --resume to continue it or choose another --output"
        )
    if resume and not (run_dir / ckpt.STATE).exists():
        raise TrainingError(f"nothing to resume in {run_dir}: no {ckpt.STATE}; start without --resume")
    if ctx.is_main:
        _check_writable(run_dir)
    ctx.barrier()  # every process has checked the directory before the main one writes into it
    return run_dir


def _check_writable(run_dir: Path) -> None:
    """The run directory, or the deepest folder above it that exists, is a directory that accepts new entries.

    Probed by creating and removing a temporary folder there (permission bits alone do not say it:
    root may not write under /proc, nor anyone on a read-only mount).
    """
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output {run_dir}: {existing} is a file, not a directory: choose another --output")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".binarize-probe-"))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"output {run_dir}: cannot write in {existing} ({reason}): choose another --output") from err


def create_run_dir(run_dir: Path) -> None:
    """Creates the run directory (and missing folders above it) just before the run's first file is written."""
    run_dir.mkdir(parents=True, exist_ok=True)


def check_same_recipe(run_dir: Path, recipe: Recipe, state: dict[str, Any]) -> None:
    """A resumed run follows the recipe it started with, except for ``train`` settings and the ``epochs``
    of the stage in progress and later stages (to train longer: the rest of their schedules follow the
    new length)."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise TrainingError(f"cannot resume the run in {run_dir}: its {RECIPE_FILE} is missing; start a new run")
    saved = yaml.safe_load(path.read_text())
    current = recipe.to_dict()
    done = state["stage"]
    for key in current:
        old, new = saved.get(key), current[key]
        if key == "stages" and isinstance(old, list) and len(old) == len(new):  # later stages may change length
            old = [_without_epochs(s) if i >= done else s for i, s in enumerate(old)]
            new = [_without_epochs(s) if i >= done else s for i, s in enumerate(new)]
        if key != "train" and old != new:
            raise TrainingError(
                f"the recipe's '{key}' differs from the run in {run_dir}; resume with the same recipe and options"
            )
    stage = recipe.stages[done]
    if stage.epochs < state["epoch"]:
        raise TrainingError(
            f"stage '{stage.name}' of the run in {run_dir} has already trained {state['epoch']} epochs; "
            f"resume with at least that many epochs (got {stage.epochs})"
        )


def _without_epochs(stage: Any) -> Any:
    return {k: v for k, v in stage.items() if k != "epochs"} if isinstance(stage, dict) else stage


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Writes the resolved recipe beside the run (``recipe.yaml``)."""
    text = dump_recipe(recipe)
    atomic_write(run_dir / RECIPE_FILE, lambda tmp: Path(tmp).write_text(text), force=True)
