"""``binarize finetune``: convert a float model and train the binary model back, following a recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

import binarize
import binarize.engine
from binarize.cli._common import (
    OfflineOption,
    build_model,
    check_num_classes,
    check_run_dir,
    decide_offline,
    errors_as_one_line,
)

__all__ = ["EXAMPLES", "finetune_command", "recipe_from_options"]

EXAMPLES = """Examples:

binarize finetune --recipe cifar10-resnet20-posthoc --data cifar10 --weights resnet20.th -o runs/r20

binarize finetune --recipe cifar10-resnet20-posthoc --data cifar10 --weights resnet20.th -o runs/r20 --resume

torchrun --nproc_per_node 4 -m binarize.cli.main finetune --recipe imagenet-resnet18-posthoc --data imagenet -o runs/in
"""


def recipe_from_options(
    recipe: str,
    model: str | None,
    weights: Path | None,
    pretrained: bool | None,
    num_classes: int | None,
    epochs: int | None,
    batch_size: int | None,
    limit_train: int | None,
    device: str | None,
    overrides: list[str],
    *,
    limit_val: int | None = None,
) -> binarize.Recipe:
    """The recipe with the command-line options applied (they override the file, --set overrides both)."""
    # Strings go in as quoted YAML scalars (JSON), so paths with '#', ': ' or a leading '*' stay as given.
    sets = []
    if model is not None:
        sets += [f"model.spec={json.dumps(model)}", "model.weights=null"]
    if weights is not None:
        sets.append(f"model.weights={json.dumps(str(weights.expanduser().resolve()))}")
    if pretrained is not None:
        sets.append(f"model.pretrained={str(pretrained).lower()}")
    if num_classes is not None:
        sets.append(f"model.num_classes={num_classes}")
    if epochs is not None:
        sets.append(f"epochs={epochs}")
    if batch_size is not None:
        sets.append(f"batch_size={batch_size}")
    if limit_train is not None:
        sets.append(f"train.limit_train={limit_train}")
    if limit_val is not None:
        sets.append(f"train.limit_val={limit_val}")
    if device is not None:
        sets.append(f"train.device={json.dumps(device)}")
    return binarize.load_recipe(recipe, [*sets, *overrides])


@errors_as_one_line
def finetune_command(
    recipe: Annotated[str, typer.Option(help="A shipped recipe name (binarize recipes) or a YAML file.")],
    data: Annotated[
        Path | None, typer.Option(help="Dataset directory: train/ and val/ or test/ class folders.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model spec overriding the recipe's (as for convert).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Float weights file for the model.")] = None,
    pretrained: Annotated[bool | None, typer.Option(help="Download timm/torchvision weights.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Number of output classes.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory.")] = Path("runs/binarize"),
    epochs: Annotated[int | None, typer.Option(help="Epochs of every stage.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size of every stage (per process).")] = None,
    limit_train: Annotated[int | None, typer.Option(help="Train on a class-balanced random subset.")] = None,
    limit_val: Annotated[
        int | None, typer.Option(help="Validate every epoch on a seeded, class-balanced subset of this many images.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its last checkpoint.")] = False,
    offline: OfflineOption = None,
    overrides: Annotated[
        list[str], typer.Option("--set", help="Override a recipe field: key=value (dotted path), repeatable.")
    ] = [],  # noqa: B006
) -> None:
    """Fine-tune a binary model from a float one; writes checkpoints, metrics.jsonl and the recipe."""
    check_num_classes(num_classes)
    check_run_dir(output)
    resolved = recipe_from_options(
        recipe, model, weights, pretrained, num_classes, epochs, batch_size, limit_train, device, overrides,
        limit_val=limit_val,
    )  # fmt: skip
    ctx = binarize.engine.from_environment()
    float_model = None
    spec = resolved.model.spec
    if spec:
        weights_file = Path(resolved.model.weights) if resolved.model.weights else None
        # Built here (the command decides offline and says what --weights loaded), from the recipe's seed as
        # binarize.finetune would build it: every process of a torchrun job gets the same initialisation.
        torch.manual_seed(resolved.train.seed)
        float_model = build_model(
            spec,
            pretrained=resolved.model.pretrained,
            num_classes=resolved.model.num_classes,
            weights=weights_file,
            offline=decide_offline(offline, spec, resolved.model.pretrained, weights_file),
            pretrained_hint="--no-pretrained (the recipe's model.pretrained)",
            num_classes_origin="--num-classes" if num_classes is not None else "the recipe's model.num_classes",
            report=ctx.is_main,
        )
    result = binarize.finetune(float_model, resolved, data_dir=data, output_dir=output, resume=resume, ctx=ctx)
    if ctx.is_main:
        best = result.best
        typer.echo(
            f"best: epoch {best.get('epoch')} top-1 {best.get('val_top1', float('nan')):.2f}% -> "
            f"{output / 'best.safetensors'}",
            err=True,
        )
    ctx.shutdown()
