"""Command-line options generated from a configuration dataclass's fields, in one place.

A :class:`Section` names a :class:`binarize.config.Config` subclass (``binarize.Policy``,
``binarize.LayerOptions``) and how its fields are spelt on the command line. :func:`config_options`
adds one typer option per field to a command: its type, default and choices come from the field, its
help from the "Args:" section of the class docstring. It also adds ``--set SECTION.FIELD=VALUE``.
The command then receives one validated config per section instead of the separate values; errors
name the field (``policy.shortcuts: must be one of ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import typer
import yaml
from rich.markup import escape

import binarize

__all__ = ["Section", "config_options", "docstring_args", "parse_set"]

_ARG_LINE = re.compile(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Section:
    """How the fields of one configuration class appear as options.

    Attributes:
        cls: The configuration class (a frozen dataclass deriving from ``binarize.config.Config``).
        skip: Fields that get no option of their own (still reachable with ``--set``).
        names: Option names (without the dashes) for fields not spelt like the field (``_`` -> ``-``).
        inverted: Boolean fields (default True) set by a flag that means "false": ``{field: (flag name, help)}``.
        panel: The heading the options are listed under in ``--help``.
    """

    cls: type
    panel: str | None = None
    skip: tuple[str, ...] = ()
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    inverted: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.init]

    def option_fields(self) -> list[dataclasses.Field]:
        return [f for f in self.fields() if f.name not in self.skip]


def docstring_args(cls: type) -> dict[str, str]:
    """The Google-style "Args:" entries of a class docstring, one line each, double backticks removed."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    found: dict[str, list[str]] = {}
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        match = _ARG_LINE.match(line.strip())
        if depth == indent and match:
            current = match.group(1)
            found[current] = [match.group(2)]
        elif depth > indent and current is not None:
            found[current].append(line.strip())
        else:
            break
    return {name: " ".join(parts).replace("``", "") for name, parts in found.items()}


def _base(hint: Any) -> tuple[Any, bool]:
    """``(hint without None, whether None is allowed)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _parameter(section_name: str, section: Section, field: dataclasses.Field, hint: Any, doc: str) -> inspect.Parameter:
    """The typer parameter of one field: its type, default, choices and help."""
    param = f"{section_name}__{field.name}"
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    help_text = escape(doc) if doc else f"{section_name}.{field.name}"
    if field.name in section.inverted:
        if default is not True:
            raise TypeError(f"{section.cls.__name__}.{field.name}: an inverted flag needs a True default")
        flag, flag_help = section.inverted[field.name]
        option = typer.Option(f"--{flag}", help=escape(flag_help), rich_help_panel=section.panel)
        return _keyword(param, Annotated[bool, option], False)
    name = section.names.get(field.name, field.name.replace("_", "-"))
    base, optional = _base(hint)
    origin = typing.get_origin(base)
    if base is bool and not optional:
        option = typer.Option(f"--{name}/--no-{name}", help=help_text, rich_help_panel=section.panel)
        return _keyword(param, Annotated[bool, option], default)
    if origin in (tuple, list):
        option = typer.Option(f"--{name}", help=f"{help_text} Repeatable.", rich_help_panel=section.panel)
        return _keyword(param, Annotated[list[str] | None, option], None)
    if origin is Literal:
        choices = [str(c) for c in typing.get_args(base)]
        option = typer.Option(f"--{name}", help=help_text, metavar="|".join(choices), rich_help_panel=section.panel)
        kind = str
    elif base in (int, float, str):
        option = typer.Option(f"--{name}", help=help_text, rich_help_panel=section.panel)
        kind = base
    else:
        raise TypeError(f"{section.cls.__name__}.{field.name}: no command-line option for the type {hint!r}")
    return _keyword(param, Annotated[kind | None, option] if optional else Annotated[kind, option], default)


def _parameters(section_name: str, section: Section) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(section.cls)
    docs = docstring_args(section.cls)
    return [_parameter(section_name, section, f, hints[f.name], docs.get(f.name, "")) for f in section.option_fields()]


def parse_set(text: str, sections: Mapping[str, Section]) -> tuple[str, str, Any]:
    """``"policy.keep=[layer4.*]"`` -> ``("policy", "keep", ["layer4.*"])``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    section_name, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
        example = next(iter(sections))
        raise binarize.BinarizeError(f"--set takes SECTION.FIELD=VALUE (e.g. {example}.FIELD=VALUE), got {text!r}")
    if section_name not in sections:
        close = difflib.get_close_matches(section_name, list(sections), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the sections are {', '.join(sections)}"
        raise binarize.BinarizeError(f"--set {text}: unknown section '{section_name}'{hint}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise binarize.BinarizeError(f"--set {text}: the value is not valid YAML ({err.problem})") from None
    return section_name, field, value


def config_options(sections: Mapping[str, Section], *, set_option: bool = True) -> Callable:
    """Adds the options of each section's fields (and ``--set``) to a typer command.

    The decorated function has a parameter named after each section (``policy``, ``layer``); it is
    called with the config built from the options, the ``--set`` values applied over them.
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
        kept = [p for p in kept if p.name not in sections]
        generated = [p for name, section in sections.items() for p in _parameters(name, section)]
        if set_option:
            fields = " or ".join(f"{n}.FIELD=VALUE" for n in sections)
            help_text = f"Set any field: {fields} (the value is YAML); repeatable; wins over the options above."
            annotation = Annotated[list[str] | None, typer.Option("--set", help=escape(help_text))]
            generated.append(_keyword("config_sets", annotation, None))
        lists = {
            (name, f.name)
            for name, section in sections.items()
            for f in section.option_fields()
            if typing.get_origin(_base(typing.get_type_hints(section.cls)[f.name])[0]) in (tuple, list)
        }

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {name: {} for name in sections}
            for name, section in sections.items():
                for f in section.option_fields():
                    value = kwargs.pop(f"{name}__{f.name}")
                    if f.name in section.inverted:
                        value = not value
                    elif (name, f.name) in lists:
                        value = list(value or ())
                    values[name][f.name] = value
            for text in kwargs.pop("config_sets", None) or ():
                section_name, field, value = parse_set(text, sections)
                values[section_name][field] = value
            configs = {name: section.cls.from_dict(values[name], name) for name, section in sections.items()}
            return fn(**kwargs, **configs)

        parameters = kept + generated
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
