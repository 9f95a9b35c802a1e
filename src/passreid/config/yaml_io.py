"""YAML reading and writing with YAML 1.2 number rules and ``_base_`` inheritance.

PyYAML follows YAML 1.1, where ``4e-4`` (no dot) is a *string*. Learning rates are written
that way all the time, so the loader here also resolves ``4e-4``, ``1E5``, ``-2e+3`` as floats,
and the dumper quotes strings that would otherwise read back as such floats. Duplicate keys
in one mapping are an error instead of silently keeping the last one.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

BASE_KEY = "_base_"

# Floats with an exponent but no dot ("4e-4", "1E5"): YAML 1.2 floats that 1.1 reads as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads exponent-only floats as floats and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: SafeConstructor reports it with a position
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class ConfigDumper(yaml.SafeDumper):
    """SafeDumper whose resolver knows the same floats, so float-looking strings get quoted."""


def _represent_list(dumper: ConfigDumper, data: list) -> yaml.SequenceNode:
    inline = all(isinstance(item, (str, int, float, bool, type(None))) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


ConfigDumper.add_representer(list, _represent_list)
for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789"))


def parse_yaml_value(text: str) -> Any:
    """Parse one scalar/list/dict written in YAML (as in a ``key=value`` override)."""
    return yaml.load(text, Loader=ConfigLoader)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text for ``data``: key order kept, short scalar lists inline (``[256, 128]``)."""
    return yaml.dump(dict(data), Dumper=ConfigDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)


@dataclass(frozen=True)
class Layer:
    """One source of config values, in increasing precedence order inside a list of layers."""

    label: str  # a file path, "command line" or a flag name; shown in error messages
    data: Mapping[str, Any]


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read one YAML file whose top level must be a mapping (an empty file is ``{}``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping of keys, "
                          f"got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """New dict: ``override`` on top of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_layers(path: str | os.PathLike) -> list[Layer]:
    """The files of a ``_base_`` chain as layers, lowest precedence first.

    ``_base_`` is a path or a list of paths relative to the file that names it. Bases are
    applied in list order (later ones win), then the file's own keys win over all bases.
    """
    layers: list[Layer] = []
    _collect_layers(resolve_recipe_path(path).absolute(), (), layers)
    return layers


RECIPES_PREFIX = "configs"


def packaged_recipes_dir() -> Path:
    """The recipes shipped inside the package (``passreid/configs``, the repository's ``configs/``)."""
    return Path(__file__).resolve().parent.parent / RECIPES_PREFIX


def resolve_recipe_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists; else a relative ``configs/...`` path is looked up among the recipes
    shipped with the package, so ``--config-file configs/finetune/market/pass_vit_s.yaml`` works from any
    directory and with a non-editable install. Anything else is returned unchanged (the reader reports it)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or not given.parts or given.parts[0] != RECIPES_PREFIX:
        return given
    packaged = packaged_recipes_dir().joinpath(*given.parts[1:])
    return packaged if packaged.is_file() else given


def load_yaml_with_bases(path: str | os.PathLike) -> dict[str, Any]:
    """One YAML config with its whole ``_base_`` chain merged in (``_base_`` itself removed)."""
    merged: dict[str, Any] = {}
    for layer in load_yaml_layers(path):
        merged = deep_merge(merged, layer.data)
    return merged


def _collect_layers(path: Path, chain: tuple[Path, ...], layers: list[Layer]) -> None:
    path = Path(os.path.normpath(path))
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"circular _base_ chain: {cycle}")
    if not path.is_file():
        where = f" (named in _base_ of {chain[-1]})" if chain else ""
        shipped = "" if chain else f"; the recipes shipped with passreid are under {packaged_recipes_dir()}"
        raise ConfigError(f"config file not found: {path}{where}{shipped}")
    data = read_yaml_mapping(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    for base in bases:
        base_path = Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        _collect_layers(base_path, (*chain, path), layers)
    layers.append(Layer(str(path), data))
