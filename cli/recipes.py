"""``binarize recipes``: the shipped recipes, and one of them in full."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from binarize.cli._common import console, errors_as_one_line
from binarize.recipes import list_recipes, recipe_text

__all__ = ["recipes_app"]

recipes_app = typer.Typer(help="List the shipped recipes; 'show NAME' prints one.", invoke_without_command=True)


@recipes_app.callback()
@errors_as_one_line
def list_command(ctx: typer.Context) -> None:
    """List the shipped recipes with one line each."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="binarize recipes", header_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("what")
    for name, description in list_recipes().items():
        table.add_row(name, description)
    console.print(table)


@recipes_app.command("show")
@errors_as_one_line
def show_command(name: Annotated[str, typer.Argument(help="Recipe name or YAML file.")]) -> None:
    """Print a recipe's YAML."""
    typer.echo(recipe_text(name), nl=False)
