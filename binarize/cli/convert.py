"""``binarize convert``: a float model in, a binary model file out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import binarize
from binarize._utils import default_example_inputs
from binarize.cli._common import FormatOption, OutputFormat, console, errors_as_one_line, parse_input_size, print_json
from binarize.cli._common import stderr as err_console
from binarize.cli._report import render_report
from binarize.nn import LayerOptions

__all__ = ["convert_command", "policy_from_options", "model_from_options"]

EXAMPLES = """
Examples:

  binarize convert resnet18 --no-pretrained --num-classes 10 --input-size 3,32,32 --dry-run

  binarize convert cifar_resnet20 --weights resnet20.th --shortcuts bireal -o resnet20-binary.safetensors

  binarize convert my_nets.py:make_net --weights net.pt --keep 'layer4.*' --format json
"""


def policy_from_options(
    keep_first: bool,
    keep_last: bool,
    keep_depthwise: bool,
    keep_grouped: bool,
    keep_shortcut_1x1: bool,
    keep_se: bool,
    min_in_channels: int,
    keep: list[str],
    binarize_rules: list[str],
    activation: str,
    shortcuts: str,
    shortcut_downsample: str,
) -> binarize.Policy:
    return binarize.Policy.from_dict(
        {
            "keep_first": keep_first,
            "keep_last": keep_last,
            "keep_depthwise": keep_depthwise,
            "keep_grouped": keep_grouped,
            "keep_shortcut_1x1": keep_shortcut_1x1,
            "keep_se": keep_se,
            "min_in_channels": min_in_channels,
            "keep": list(keep),
            "binarize": list(binarize_rules),
            "activation": activation,
            "shortcuts": shortcuts,
            "shortcut_downsample": shortcut_downsample,
        },
        "policy",
    )


def model_from_options(model: str, weights: Path | None, pretrained: bool, num_classes: int | None):
    return binarize.create_model(model, pretrained=pretrained, num_classes=num_classes, weights=weights)


def _default_output(model: str) -> Path:
    name = model.rsplit(":", 1)[-1].replace("/", "_")
    return Path(f"{name}-binary.safetensors")


@errors_as_one_line
def convert_command(
    model: Annotated[
        str, typer.Argument(help="timm name (resnet18), torchvision:NAME, or FILE.py:FACTORY / pkg.mod:FACTORY.")
    ],
    weights: Annotated[Path | None, typer.Option(help="State-dict file (.safetensors/.pt/.pth/.th) to load.")] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Download timm/torchvision weights (ignored with --weights).")
    ] = True,
    num_classes: Annotated[int | None, typer.Option(help="Number of output classes.")] = None,
    input_size: Annotated[str | None, typer.Option(help="Input size C,H,W (default: the model's).")] = None,
    keep_first: Annotated[bool, typer.Option(help="Keep the first conv in float.")] = True,
    keep_last: Annotated[bool, typer.Option(help="Keep the last layer in float.")] = True,
    keep_depthwise: Annotated[bool, typer.Option(help="Keep depthwise convs in float.")] = True,
    keep_grouped: Annotated[bool, typer.Option(help="Keep grouped convs in float.")] = True,
    keep_shortcut_1x1: Annotated[bool, typer.Option(help="Keep 1x1 shortcut convs in float.")] = True,
    keep_se: Annotated[bool, typer.Option(help="Keep squeeze-excitation convs in float.")] = True,
    min_in_channels: Annotated[int, typer.Option(help="Keep convs with fewer input channels in float.")] = 8,
    keep: Annotated[list[str], typer.Option(help="Keep these layers float: name, glob, re:REGEX or type:Class.")] = [],  # noqa: B006
    binarize_rule: Annotated[
        list[str], typer.Option("--binarize", help="Binarize these layers against the defaults (same forms).")
    ] = [],  # noqa: B006
    activation: Annotated[str, typer.Option(help="hardtanh, identity, prelu or keep.")] = "hardtanh",
    shortcuts: Annotated[str, typer.Option(help="none or bireal (a real shortcut around each binary conv).")] = "none",
    shortcut_downsample: Annotated[str, typer.Option(help="avgpool_conv or zero_pad.")] = "avgpool_conv",
    activations_only: Annotated[bool, typer.Option(help="Binarize activations only (float weights).")] = False,
    activation_bias: Annotated[
        bool, typer.Option(help="A learnable threshold per input channel before each sign (ReActNet's RSign).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the report; write nothing.")] = False,
    output_format: FormatOption = OutputFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
) -> None:
    """Convert a float model into a ReCU binary model and write it as a .safetensors file."""
    policy = policy_from_options(
        keep_first, keep_last, keep_depthwise, keep_grouped, keep_shortcut_1x1, keep_se, min_in_channels,
        keep, binarize_rule, activation, shortcuts, shortcut_downsample,
    )  # fmt: skip
    layer = LayerOptions(binarize_weights=not activations_only, activation_bias=activation_bias)
    size = parse_input_size(input_size)
    destination = output or _default_output(model)
    if not dry_run and destination.exists() and not force:
        raise binarize.BinarizeError(f"{destination} already exists; pass --force to overwrite it")
    float_model = model_from_options(model, weights, pretrained, num_classes)
    binary = binarize.convert(float_model, policy, default_example_inputs(float_model, size), layer=layer)
    report = binarize.inspect(binary)
    if output_format is OutputFormat.json:
        print_json(report.to_dict())
    else:
        render_report(report, console, title=model)
    if not dry_run:
        binarize.save(binary, destination, force=force)
        err_console.print(f"wrote {destination}")


convert_command.__doc__ += EXAMPLES
