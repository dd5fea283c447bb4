"""``binarize convert``: a float model in, a binary model file out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import binarize
from binarize.cli._common import (
    FormatOption,
    OfflineOption,
    OutputFormat,
    build_model,
    check_num_classes,
    check_output_file,
    console,
    decide_offline,
    errors_as_one_line,
    example_inputs,
    note,
    parse_input_size,
    print_json,
    print_warnings,
)
from binarize.cli._options import Section, config_options
from binarize.cli._report import render_report

__all__ = ["CONVERT_SECTIONS", "EXAMPLES", "convert_command"]

EXAMPLES = """Examples:

binarize convert resnet18 --no-pretrained --num-classes 10 --input-size 3,32,32 --dry-run

binarize convert cifar_resnet20 --weights resnet20.th --shortcuts bireal -o resnet20-binary.safetensors

binarize convert my_nets.py:make_net --weights net.pt --keep 'layer4.*' --format json

binarize convert cifar_resnet20 --no-pretrained --set layer.tau=0.9 --set policy.keep=[conv1] --dry-run
"""

CONVERT_SECTIONS = {
    "policy": Section(binarize.Policy, skip=("version",), panel="Policy: which layers become binary (binarize.Policy)"),
    "layer": Section(
        binarize.LayerOptions,
        panel="Binary layers (binarize.LayerOptions)",
        inverted={
            "binarize_weights": (
                "activations-only",
                "Binarize activations only, keep float weights (layer.binarize_weights false): the first "
                "stage of two-stage training (ReActNet).",
            )
        },
    ),
}
"""The configurations whose fields ``convert`` takes as options: ``Policy`` and ``LayerOptions``."""


def _default_output(model: str) -> Path:
    name = model.rsplit(":", 1)[-1].replace("/", "_")
    return Path(f"{name}-binary.safetensors")


@errors_as_one_line
@config_options(CONVERT_SECTIONS)
def convert_command(
    model: Annotated[
        str,
        typer.Argument(
            help="timm name (resnet18), hf-hub:ORG/NAME, torchvision:NAME, or FILE.py:FACTORY / pkg.mod:FACTORY."
        ),
    ],
    policy: binarize.Policy,
    layer: binarize.LayerOptions,
    weights: Annotated[Path | None, typer.Option(help="State-dict file (.safetensors/.pt/.pth/.th) to load.")] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Download timm/torchvision weights (ignored with --weights).")
    ] = True,
    num_classes: Annotated[
        int | None, typer.Option(help="Number of output classes (0: no head; other weights' head is re-initialised).")
    ] = None,
    input_size: Annotated[str | None, typer.Option(help="Input size C,H,W (default: the model's).")] = None,
    offline: OfflineOption = None,
    dry_run: Annotated[bool, typer.Option(help="Print the report; write nothing.")] = False,
    output_format: FormatOption = OutputFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
) -> None:
    """Convert a float model into a ReCU binary model and write it as a .safetensors file."""
    check_num_classes(num_classes)
    size = parse_input_size(input_size)
    destination = output or _default_output(model)
    if not dry_run:
        check_output_file(destination, force)
    float_model = build_model(
        model,
        pretrained=pretrained,
        num_classes=num_classes,
        weights=weights,
        offline=decide_offline(offline, model, pretrained, weights),
    )
    binary = binarize.convert(float_model, policy, example_inputs(float_model, size), layer=layer)
    print_warnings(binary)
    report = binarize.inspect(binary)
    if output_format is OutputFormat.json:
        print_json(report.to_dict())
    else:
        render_report(report, console, title=model)
    if not dry_run:
        binarize.save(binary, destination, force=force)
        note(f"wrote {destination}")
