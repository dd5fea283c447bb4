"""``binarize recipes``: the shipped recipes, and one of them in full."""

from __future__ import annotations

from typing import Annotated

import typer

from binarize.cli._common import errors_as_one_line
from binarize.recipes import list_recipes, recipe_text

__all__ = ["recipes_app"]

recipes_app = typer.Typer(help="List the shipped recipes; 'show NAME' prints one.", invoke_without_command=True)


@recipes_app.callback()
@errors_as_one_line
def list_command(ctx: typer.Context) -> None:
    """List the shipped recipes with one line each."""
    if ctx.invoked_subcommand is not None:
        return
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, description in recipes.items():  # plain lines: never wrapped, easy to grep
        typer.echo(f"{name:<{width}}  {description}".rstrip())


@recipes_app.command("show")
@errors_as_one_line
def show_command(name: Annotated[str, typer.Argument(help="Recipe name or YAML file.")]) -> None:
    """Print a recipe's YAML."""
    typer.echo(recipe_text(name), nl=False)
