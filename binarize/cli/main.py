"""The ``binarize`` application: one command per module of this package."""

from __future__ import annotations

import typer

from binarize.cli.convert import convert_command
from binarize.cli.demo import demo_command
from binarize.cli.diagnose import diagnose_command
from binarize.cli.eval import eval_command
from binarize.cli.finetune import finetune_command
from binarize.cli.inspect import inspect_command
from binarize.cli.recipes import recipes_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="binarize",
    help="Turn a pretrained float model into a ReCU binary network and fine-tune it back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("convert")(convert_command)
app.command("finetune")(finetune_command)
app.command("eval")(eval_command)
app.command("inspect")(inspect_command)
app.add_typer(recipes_app, name="recipes")
app.command("diagnose")(diagnose_command)
app.command("demo")(demo_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
