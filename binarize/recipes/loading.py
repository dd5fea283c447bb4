"""Reading recipes: shipped names and YAML files (strictly), ``--set`` overrides, and the YAML a run writes."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from binarize._utils import nearest
from binarize.errors import ConfigError
from binarize.recipes.schema import Recipe, StageConfig

__all__ = ["load_recipe", "list_recipes", "recipe_text", "apply_overrides", "dump_recipe"]


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` and ``1.0e5`` are numbers (as in YAML 1.2), not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: plain data only


def _shipped_dir():
    """The folder of the shipped recipe files (package data of ``binarize.recipes``)."""
    return importlib.resources.files("binarize.recipes")


def list_recipes() -> dict[str, str]:
    """Shipped recipe names and their one-line descriptions."""
    found = {}
    for entry in sorted(_shipped_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            found[entry.name[: -len(".yaml")]] = str(data.get("description", ""))
    return found


def recipe_text(name_or_path: str | Path) -> str:
    """The YAML text of a shipped recipe or a recipe file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path.read_text()
    entry = _shipped_dir() / f"{name_or_path}.yaml"
    if not entry.is_file():
        names = list(list_recipes())
        raise ConfigError(f"unknown recipe '{name_or_path}'{nearest(str(name_or_path), names)} (see: binarize recipes)")
    return entry.read_text()


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Loads a shipped recipe by name, or a YAML file, strictly; then applies ``key=value`` overrides."""
    text = recipe_text(name_or_path)
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {name_or_path}: not valid YAML ({str(err).splitlines()[0]})") from err
    recipe = Recipe.from_dict(data if data is not None else {}, "")
    return apply_overrides(recipe, overrides)


def _set_path(data: dict[str, Any], parts: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {full}: '{part}' is not a valid index (0 to {len(node) - 1})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                raise _unknown_key(data, parts[:i], part, full)
            if node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {full}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {full}: '{last}' is not a valid index (0 to {len(node) - 1})")
        node[int(last)] = value
    elif isinstance(node, dict):
        if last not in node:
            raise _unknown_key(data, parts[:-1], last, full)
        node[last] = value
    else:
        raise ConfigError(f"--set {full}: '{'.'.join(parts[:-1])}' is a value, not a section")


def _stage_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(StageConfig)]


def _unknown_key(data: dict[str, Any], where: list[str], key: str, full: str) -> ConfigError:
    """The error for a key that is not at ``where``, suggesting where a field of that name (or a close one) is.

    A field of exactly that name under ``where``, else anywhere in the recipe, is suggested by its
    full path (a stage field also by its every-stage form, ``optimizer.lr``). Else the closer of: a
    key at ``where`` (at the top level: or a stage field), and a field name anywhere (by its paths).
    """
    node: Any = data
    for part in where:
        node = node[int(part)] if isinstance(node, list) else node[part]
    paths = [where + p for p in _paths_named(node, key)] or _paths_named(data, key)
    if not paths:
        local = _closest(key, list(node) + (_stage_fields() if not where else []), cutoff=0.5)
        deep = _closest(key, _field_names(data), cutoff=0.7)
        if local is not None and (deep is None or local[0] >= deep[0]):
            return ConfigError(f"--set {full}: unknown key '{key}'; did you mean '{local[1]}'?")
        paths = _paths_named(data, deep[1]) if deep is not None else []
    suggestion = f"; did you mean {_spell_paths(data, paths)}?" if paths else ""
    return ConfigError(f"--set {full}: unknown key '{key}'{suggestion}")


def _closest(word: str, choices: Iterable[str], cutoff: float) -> tuple[float, str] | None:
    """The most similar choice and its similarity (difflib's ratio), if at least ``cutoff``."""
    scored = [(difflib.SequenceMatcher(None, word, c).ratio(), c) for c in sorted(set(choices))]
    best = max(scored, key=lambda sc: sc[0], default=None)
    return best if best is not None and best[0] >= cutoff else None


def _paths_named(node: Any, name: str, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Paths (from ``node``) of every field called ``name``, in document order."""
    found: list[list[str]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        path = (*prefix, str(key))
        if isinstance(node, dict) and key == name:
            found.append(list(path))
        found += _paths_named(child, name, path)
    return found


def _field_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {n for child in node.values() for n in _field_names(child)}
    if isinstance(node, list):
        return {n for child in node for n in _field_names(child)}
    return set()


def _spell_paths(data: dict[str, Any], paths: list[list[str]], limit: int = 3) -> str:
    """``'train.seed'``; a field of the stages as ``'optimizer.lr' (every stage) or 'stages.0.optimizer.lr'``."""
    spelled: list[str] = []
    stage_fields: set[str] = set()
    for path in paths:
        if path[0] == "stages" and len(path) > 2:
            rest = ".".join(path[2:])
            if rest in stage_fields:  # the same field of a later stage
                continue
            stage_fields.add(rest)
            if path[2] not in data:  # apply_overrides' every-stage form reaches it
                spelled.append(f"'{rest}' (every stage)")
            spelled.append(f"'stages.{path[1]}.{rest}'")
        elif f"'{'.'.join(path)}'" not in spelled:
            spelled.append(f"'{'.'.join(path)}'")
    spelled = spelled[:limit]
    return spelled[0] if len(spelled) == 1 else ", ".join(spelled[:-1]) + " or " + spelled[-1]


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Changes fields by dotted path: ``stages.0.optimizer.lr=0.01``, ``policy.shortcuts=bireal``.

    A path that starts with a stage field (``distill.teacher=none``, ``epochs=3``) applies to every
    stage. Values are parsed as YAML scalars (``null``, ``true``, ``0.1``, ``1e-3``, ``[3, 32, 32]``).
    The result is validated like a recipe file.
    """
    if not overrides:
        return recipe
    data = recipe.to_dict()
    stage_fields = set(_stage_fields())
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set takes key=value (e.g. stages.0.optimizer.lr=0.01), got {item!r}")
        try:
            value = _parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: cannot parse the value ({str(err).splitlines()[0]})") from err
        parts = key.split(".")
        if parts[0] not in data and parts[0] in stage_fields:
            for index in range(len(data["stages"])):
                _set_path(data, ["stages", str(index), *parts], value, item)
        else:
            _set_path(data, parts, value, item)
    return Recipe.from_dict(data, "")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML (the resolved recipe written next to every run)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
