"""The ``binarize`` application: one command per module of this package.

Every error ends a command with one ``error: ...`` line on stderr: the library's errors (through
:func:`binarize.cli._common.errors_as_one_line`) and the command line's own usage errors (an unknown
option, a missing argument, a value of the wrong type: :class:`OneLineErrors`), exit status 2.
``--help`` stays rich.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

import binarize
from binarize.cli.bench import bench_command
from binarize.cli.convert import EXAMPLES as CONVERT_EXAMPLES
from binarize.cli.convert import convert_command
from binarize.cli.demo import demo_command
from binarize.cli.diagnose import diagnose_command
from binarize.cli.eval import eval_command
from binarize.cli.export import EXAMPLES as EXPORT_EXAMPLES
from binarize.cli.export import export_command
from binarize.cli.finetune import EXAMPLES as FINETUNE_EXAMPLES
from binarize.cli.finetune import finetune_command
from binarize.cli.inspect import inspect_command
from binarize.cli.recipes import recipes_app

__all__ = ["OneLineErrors", "app", "main"]


def _click_class(name: str) -> type[BaseException]:
    """A class of the click that typer bundles, reached from its public ``typer.BadParameter``."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_ClickException = _click_class("ClickException")


class OneLineErrors(TyperGroup):
    """The top-level group: a usage error anywhere below it is one ``error:`` line on stderr, exit 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as err:
            if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                sys.stderr.write(f"error: {_usage_message(err)}\n")
                sys.stderr.flush()
            sys.exit(err.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _usage_message(err: BaseException) -> str:
    message = " ".join(line.strip() for line in err.format_message().splitlines() if line.strip())
    ctx = getattr(err, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"binarize {binarize.__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="binarize",
    cls=OneLineErrors,
    help="Turn a pretrained float model into a ReCU binary network and fine-tune it back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
) -> None:
    """Turn a pretrained float model into a ReCU binary network and fine-tune it back."""


app.command("convert", epilog=escape(CONVERT_EXAMPLES))(convert_command)
app.command("finetune", epilog=escape(FINETUNE_EXAMPLES))(finetune_command)
app.command("eval")(eval_command)
app.command("inspect")(inspect_command)
app.add_typer(recipes_app, name="recipes")
app.command("diagnose")(diagnose_command)
app.command("export", epilog=escape(EXPORT_EXAMPLES))(export_command)
app.command("bench")(bench_command)
app.command("demo")(demo_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="binarize")


if __name__ == "__main__":
    main()
