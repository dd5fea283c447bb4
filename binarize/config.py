"""Frozen configuration dataclasses: strict loading from dicts and errors that say how to fix.

Every configuration in binarize (:class:`binarize.Policy`, the recipe sections) is a frozen
dataclass deriving from :class:`Config`. It validates itself on creation (``__post_init__`` calls
:meth:`Config.validate`), renders to plain dicts and lists with :meth:`Config.to_dict` (what the
YAML recipes hold), and :meth:`Config.from_dict` reads such a dict back strictly: an unknown key is
an error naming the nearest valid key, and a wrong type names the field and the expected type.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from binarize._utils import nearest
from binarize.errors import ConfigError

__all__ = ["Config", "check", "nearest"]

T = TypeVar("T", bound="Config")


def check(condition: bool, field: str, message: str) -> None:
    """Raises :class:`ConfigError` ``"<field>: <message>"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of binarize's frozen, validated configuration dataclasses."""

    def __post_init__(self) -> None:
        # Every field is checked against its type hint, as from_dict checks a file: a wrong type or a value
        # outside a Literal's choices is a ConfigError naming the field, whichever way the config was built.
        # Lists become tuples where tuples are declared (instances stay hashable), ints become floats.
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                converted = _convert(value, hints[f.name], f.name)
            except ConfigError:
                self._validate_first()
                raise
            if converted is not value:
                object.__setattr__(self, f.name, converted)
        self.validate()

    def _validate_first(self) -> None:
        """Runs :meth:`validate` on a config with a badly typed field: its own checks, where they apply,
        say better what is wrong (``input_size: give [channels, height, width]``) than the type does."""
        try:
            self.validate()
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - checks written for well-typed values may fail otherwise
            return

    def validate(self) -> None:
        """Checks field values; subclasses raise :class:`ConfigError` through :func:`check`."""

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain dicts, lists and scalars (the form the YAML files hold)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed, validated like a new instance."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str = "") -> T:
        """Reads a configuration strictly from a dict such as :meth:`to_dict` returns.

        Args:
            data: The mapping to read.
            where: Dotted path of this section, used in error messages.

        Raises:
            ConfigError: An unknown key (with the nearest valid one), a value of the wrong type,
                or a value that fails validation.
        """
        label = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{label}: expected a mapping of settings, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = _hints(cls)
        kwargs = {}
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key not in fields:
                raise ConfigError(f"{label}: unknown key '{key}'{nearest(str(key), fields)}")
            kwargs[key] = _convert(value, hints[key], path)
        try:
            return cls(**kwargs)
        except ConfigError as err:
            if where:
                raise ConfigError(f"{where}.{err}") from None
            raise


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin in (tuple, list):
        return "a list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Checks ``value`` against the type ``hint`` and converts nested sections and lists."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{path}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            suffix = nearest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{path}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{suffix}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected a list of {len(args)} values, got {len(value)}")
            items = tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
            return (
                value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value, strict=True)) else items
            )
        item = args[0] if args else Any
        items = tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value, strict=True)) else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        args = get_args(hint)
        if len(args) == 2 and args[1] is not Any:
            converted = {k: _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
            if all(converted[k] is value[k] for k in value):
                return value
            return converted
        return value
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return value if type(value) is float else float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value
