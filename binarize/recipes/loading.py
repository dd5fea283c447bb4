"""Reading recipes: shipped names and YAML files (strictly), ``--set`` overrides, and the YAML a run writes."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
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
                raise ConfigError(f"--set {full}: unknown key '{part}'{nearest(part, node)}")
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
            raise ConfigError(f"--set {full}: unknown key '{last}'{nearest(last, node)}")
        node[last] = value
    else:
        raise ConfigError(f"--set {full}: '{'.'.join(parts[:-1])}' is a value, not a section")


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Changes fields by dotted path: ``stages.0.optimizer.lr=0.01``, ``policy.shortcuts=bireal``.

    A path that starts with a stage field (``distill.teacher=none``, ``epochs=3``) applies to every
    stage. Values are parsed as YAML scalars (``null``, ``true``, ``0.1``, ``1e-3``, ``[3, 32, 32]``).
    The result is validated like a recipe file.
    """
    if not overrides:
        return recipe
    data = recipe.to_dict()
    stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
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
