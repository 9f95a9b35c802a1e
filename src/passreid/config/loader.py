"""Build typed dataclass configs from defaults, YAML recipes and ``key=value`` overrides.

Precedence, lowest first:

1. the schema's dataclass defaults (a field's ``default_factory`` instance counts, so a stage
   schema can ship ``model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_base"))``);
2. the YAML file, after its ``_base_`` chain (see :func:`passreid.config.yaml_io.load_yaml_layers`);
3. the overrides, in order (``optim.lr=4e-4 model.arch=vit_base``).

Nested mappings merge key by key; lists and scalars replace. Every value is checked against the
field's type annotation; an unknown key anywhere is a :class:`ConfigError` that names the full
dotted key and the closest valid one.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``, nested
dataclasses, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``, ``dict[K, V]``, ``Optional[T]`` /
``T | None``, other unions (first member that accepts the value wins), ``Literal[...]`` and
``Any``. Conversions that lose nothing are allowed: an int where a float is expected, an
integral float (``1e3``) where an int is expected, a list where a tuple is expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

from passreid.atomic_files import atomic_write_text

from .errors import ConfigError
from .yaml_io import Layer, deep_merge, dump_yaml, load_yaml_layers, parse_yaml_value

T = TypeVar("T")

COMMAND_LINE = "command line"
_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_NONE_TYPE = type(None)


# ----------------------------------------------------------------------------------------------
# public API


def load_config(schema: type[T], config_file: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Load ``schema`` from its defaults, an optional YAML recipe and dotlist overrides.

    Args:
        schema: a dataclass type whose fields all have defaults (or are supplied by the file).
        config_file: a YAML file; its ``_base_`` entries are resolved relative to it.
        overrides: ``key=value`` strings applied last; values are parsed as YAML
            (``4e-4`` -> float, ``true`` -> bool, ``[1,2]`` -> list, ``null`` -> None).
    Raises:
        ConfigError: unknown key, wrong type, malformed override or unreadable file.
    """
    layers = load_yaml_layers(config_file) if config_file is not None else []
    return build_config(schema, [*layers, *overrides_to_layers(schema, overrides)])


def config_from_dict(schema: type[T], data: Mapping[str, Any], source: str = "dict") -> T:
    """Validate a plain mapping (e.g. a config stored in a checkpoint) into ``schema``."""
    return build_config(schema, [Layer(source, data)])


def without_removed_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the keys of :data:`REMOVED_KEYS`: a config stored by an older version (e.g. in a model
    file) still loads, since those keys only said where the demo world was rendered."""
    result = dict(data)
    for dotted in REMOVED_KEYS:
        section, _, name = dotted.partition(".")
        if isinstance(result.get(section), Mapping) and name in result[section]:
            result[section] = {key: value for key, value in result[section].items() if key != name}
    return result


def build_config(schema: type[T], layers: Sequence[Layer]) -> T:
    """Merge ``layers`` (lowest precedence first) over the defaults and validate the result."""
    _require_dataclass_type(schema)
    merged: dict[str, Any] = {}
    for layer in layers:
        if not isinstance(layer.data, Mapping):
            raise ConfigError(f"{layer.label}: expected a mapping of config keys, "
                              f"got {type(layer.data).__name__}")
        merged = deep_merge(merged, layer.data)
    return _build_dataclass(schema, merged, "", _Context(schema, tuple(layers)))


def overrides_to_layers(schema: type, overrides: Sequence[str]) -> list[Layer]:
    """Parse ``key=value`` strings into one layer each, checking keys against ``schema``."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    return [Layer(COMMAND_LINE, _override_to_dict(schema, item)) for item in overrides]


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data for a config: dataclasses -> dicts, tuples -> lists, paths -> str."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {key: config_to_dict(value) for key, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(value) for value in cfg]
    if isinstance(cfg, PurePath):
        return str(cfg)
    return cfg


def dump_config(cfg: Any) -> str:
    """The fully resolved config as YAML text (what :func:`save_config` writes)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a dataclass config instance, got {type(cfg).__name__}")
    return dump_yaml(config_to_dict(cfg))


def save_config(cfg: Any, path: str | os.PathLike, comment: str = "") -> Path:
    """Write the fully resolved config as YAML (atomically); ``load_config`` reads it back equal.

    ``comment``: lines written first as YAML comments (e.g. what a run resolved ``auto`` values to).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return atomic_write_text(path, header + dump_config(cfg), what="config")


def field_type(schema: type, dotted_key: str) -> Any | None:
    """The annotation of ``dotted_key`` in ``schema`` (``"optim.lr"`` -> ``float``), or None."""
    annotation: Any = schema
    for part in dotted_key.split("."):
        target = _dataclass_member(annotation)
        if target is None:
            return None
        hints = _type_hints(target)
        if part not in hints or part not in _init_field_names(target):
            return None
        annotation = hints[part]
    return annotation


# ----------------------------------------------------------------------------------------------
# building and type checking


@dataclasses.dataclass(frozen=True)
class _Context:
    schema: type
    layers: tuple[Layer, ...]

    def origin(self, key: str) -> str:
        """Label of the highest-precedence layer that set ``key`` (or a section containing it)."""
        parts = key.split(".")
        for layer in reversed(self.layers):
            node: Any = layer.data
            for part in parts:
                if not isinstance(node, Mapping):
                    return layer.label  # this layer replaced a parent section by a plain value
                if part not in node:
                    break
                node = node[part]
            else:
                return layer.label
        return ""

    def where(self, key: str) -> str:
        origin = self.origin(_strip_index(key))
        return f" (from {origin})" if origin else ""


def _build_dataclass(schema: type, data: Any, prefix: str, ctx: _Context) -> Any:
    if isinstance(data, schema):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix}' must be a mapping of {schema.__name__} fields, "
                          f"got {_describe(data)}{ctx.where(prefix)}")
    hints = _type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for name in data:
        if name not in fields:
            where = ctx.where(_join(prefix, str(name)))
            raise _unknown_key_error(schema, prefix, name, ctx.schema, where)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            value = data[name]
            default = _field_default(field)
            # A field's own default instance is the base a partial mapping merges onto.
            if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
                value = deep_merge(config_to_dict(default), value)
            elif isinstance(value, Mapping) and isinstance(default, Mapping):
                value = deep_merge(default, value)
            kwargs[name] = _coerce(value, hints[name], key, ctx)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}' ({_type_name(hints[name])})")
    return schema(**kwargs)


def _coerce(value: Any, annotation: Any, key: str, ctx: _Context) -> Any:
    """``value`` converted to ``annotation``, or a ConfigError naming ``key``."""
    if annotation is Any or annotation is object:
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build_dataclass(annotation, value, key, ctx)
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return _coerce_union(value, annotation, key, ctx)
    if origin is Literal:
        return _coerce_literal(value, annotation, key, ctx)
    if origin in (list, Sequence) or annotation in (list, Sequence):
        return _coerce_list(value, annotation, key, ctx)
    if origin is tuple or annotation is tuple:
        return _coerce_tuple(value, annotation, key, ctx)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return _coerce_dict(value, annotation, key, ctx)
    if _is_scalar_type(annotation):
        return _coerce_scalar(value, annotation, key, ctx)
    raise TypeError(f"config key '{key}': unsupported type annotation {annotation!r} in the schema")


def _coerce_scalar(value: Any, annotation: type, key: str, ctx: _Context) -> Any:
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    if isinstance(annotation, type) and issubclass(annotation, PurePath) and isinstance(value, (str, PurePath)):
        return annotation(value)
    raise _type_error(key, annotation, value, ctx)


def _coerce_union(value: Any, annotation: Any, key: str, ctx: _Context) -> Any:
    members = typing.get_args(annotation)
    if value is None:
        if _NONE_TYPE in members:
            return None
        raise _type_error(key, annotation, value, ctx)
    candidates = [m for m in members if m is not _NONE_TYPE]
    if len(candidates) == 1 and not _is_scalar_type(candidates[0]):
        return _coerce(value, candidates[0], key, ctx)  # keeps errors from deeper keys
    # Try exact-type matches first so that 3 stays an int in ``int | float``.
    ordered = sorted(candidates, key=lambda m: 0 if isinstance(m, type) and type(value) is m else 1)
    for member in ordered:
        try:
            return _coerce(value, member, key, ctx)
        except ConfigError:
            continue
    raise _type_error(key, annotation, value, ctx)


def _coerce_literal(value: Any, annotation: Any, key: str, ctx: _Context) -> Any:
    choices = typing.get_args(annotation)
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    shown = ", ".join(repr(c) for c in choices)
    raise ConfigError(f"config key '{key}' must be one of {shown}; got {value!r}{ctx.where(key)}")


def _coerce_list(value: Any, annotation: Any, key: str, ctx: _Context) -> list:
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, annotation, value, ctx)
    args = typing.get_args(annotation)
    item_type = args[0] if args else Any
    return [_coerce(item, item_type, f"{key}[{i}]", ctx) for i, item in enumerate(value)]


def _coerce_tuple(value: Any, annotation: Any, key: str, ctx: _Context) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, annotation, value, ctx)
    args = typing.get_args(annotation)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(item, args[0], f"{key}[{i}]", ctx) for i, item in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"config key '{key}' expects {len(args)} items ({_type_name(annotation)}), "
                          f"got {len(value)}: {value!r}{ctx.where(key)}")
    return tuple(_coerce(item, arg, f"{key}[{i}]", ctx) for i, (item, arg) in enumerate(zip(value, args)))


def _coerce_dict(value: Any, annotation: Any, key: str, ctx: _Context) -> dict:
    if not isinstance(value, Mapping):
        raise _type_error(key, annotation, value, ctx)
    args = typing.get_args(annotation)
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    return {_coerce(k, key_type, f"{key} key", ctx): _coerce(v, value_type, _join(key, str(k)), ctx)
            for k, v in value.items()}


# ----------------------------------------------------------------------------------------------
# dotlist overrides


def _override_to_dict(schema: type, item: str) -> dict[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=4e-4")
    key, raw = (part.strip() for part in item.split("=", 1))
    if not _KEY_PATTERN.fullmatch(key):
        raise ConfigError(f"override {item!r}: '{key}' is not a dotted key like optim.lr")
    annotation = _check_override_key(schema, key)
    value = _parse_override_value(raw, annotation, key)
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def _check_override_key(schema: type, key: str) -> Any:
    """The annotation ``key`` leads to; unknown keys fail here with a suggestion."""
    annotation: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        target = _dataclass_member(annotation)
        if target is None:
            if _is_mapping_type(annotation):
                return Any  # inside a free-form dict field: any key is fine
            raise ConfigError(f"cannot set '{key}': '{prefix}' is a {_type_name(annotation)}, "
                              f"not a section with keys")
        if part not in _init_field_names(target):
            raise _unknown_key_error(target, prefix, part, schema, f" (from {COMMAND_LINE})")
        annotation = _type_hints(target)[part]
    return annotation


def _parse_override_value(raw: str, annotation: Any, key: str) -> Any:
    if raw == "":
        return ""
    try:
        value = parse_yaml_value(raw)
    except Exception as err:  # yaml errors: report the override, not a parser trace
        raise ConfigError(f"override for '{key}': cannot parse value {raw!r} ({err})") from None
    # For string fields the text itself is the value: name=001 stays "001", not the int 1.
    if isinstance(value, (bool, int, float)) and _prefers_text(annotation, value):
        return raw
    return value


def _prefers_text(annotation: Any, value: Any) -> bool:
    members = _union_members(annotation)
    if any(m is type(value) for m in members):
        return False
    for member in members:
        if member is str or (isinstance(member, type) and issubclass(member, PurePath)):
            return True
        if typing.get_origin(member) is Literal and any(isinstance(c, str) for c in typing.get_args(member)):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# errors and small helpers


#: Keys renamed so that one concept has one name in every stage: the old name is an error naming the new one.
RENAMED_KEYS = {
    "train.saveckp_freq": "train.keep_checkpoint_period",
    "train.checkpoint_every_iters": "train.checkpoint_period_iters",
    "train.stop_after_iters": "train.max_iters",
}
_RENDER_THE_DEMO_WORLD = ("the stages read folders: render the demo world with `python -m passreid.demo --out DIR` "
                          "and pass data.root=DIR/world/market (pre-training: DIR/world/pool)")
# Keys that no longer exist, with what to do instead.
REMOVED_KEYS = {
    "data.world_dir": _RENDER_THE_DEMO_WORLD,
    "data.world_seed": _RENDER_THE_DEMO_WORLD,
    "data.world_options": _RENDER_THE_DEMO_WORLD,
    "monitor.world_seed": "the kNN monitor reads a folder: pass monitor.root=DIR/monitor_world/pool after "
                          "`python -m passreid.demo --out DIR`",
}


def _unknown_key_error(schema: type, prefix: str, name: Any, root: type, where: str) -> ConfigError:
    full_key = _join(prefix, str(name))
    if full_key in RENAMED_KEYS:
        return ConfigError(f"config key '{full_key}' is now called '{RENAMED_KEYS[full_key]}'{where}")
    if full_key in REMOVED_KEYS:
        return ConfigError(f"config key '{full_key}' was removed: {REMOVED_KEYS[full_key]}{where}")
    suggestion = _closest_key(schema, prefix, str(name), root)
    if suggestion:
        hint = f" (did you mean '{suggestion}'?)"
    else:
        valid = ", ".join(_init_field_names(schema))
        hint = f"; valid keys{f' under {prefix!r}' if prefix else ''}: {valid}"
    return ConfigError(f"unknown config key '{full_key}'{hint}{where}")


def _closest_key(schema: type, prefix: str, name: str, root: type) -> str | None:
    siblings = _init_field_names(schema)
    match = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if match:
        return _join(prefix, match[0])
    # The key may sit in another section (``lr`` for ``optim.lr``): compare last segments.
    by_leaf: dict[str, str] = {}
    for dotted in _all_dotted_keys(root):
        by_leaf.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    match = difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


@functools.lru_cache(maxsize=None)
def _all_dotted_keys(schema: type) -> list[str]:
    keys: list[str] = []
    hints = _type_hints(schema)
    for name in _init_field_names(schema):
        keys.append(name)
        nested = _dataclass_member(hints[name])
        if nested is not None and nested is not schema:
            keys.extend(f"{name}.{sub}" for sub in _all_dotted_keys(nested))
    return keys


def _type_error(key: str, annotation: Any, value: Any, ctx: _Context) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(annotation)}, got {_describe(value)}"
                       f"{ctx.where(key)}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(annotation: Any) -> str:
    if annotation is _NONE_TYPE:
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(m) for m in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    return str(annotation).replace("typing.", "")


def _is_scalar_type(annotation: Any) -> bool:
    return annotation in (bool, int, float, str) or (isinstance(annotation, type)
                                                     and issubclass(annotation, PurePath))


def _union_members(annotation: Any) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def _dataclass_member(annotation: Any) -> type | None:
    """The dataclass inside ``annotation`` (itself, or the X of ``Optional[X]``), else None."""
    for member in _union_members(annotation):
        if isinstance(member, type) and dataclasses.is_dataclass(member):
            return member
    return None


def _is_mapping_type(annotation: Any) -> bool:
    return any(typing.get_origin(m) in (dict, Mapping) or m in (dict, Mapping)
               for m in _union_members(annotation))


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


@functools.lru_cache(maxsize=None)
def _type_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


@functools.lru_cache(maxsize=None)
def _init_field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema) if f.init]


def _require_dataclass_type(schema: Any) -> None:
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _strip_index(key: str) -> str:
    return re.sub(r"\[\d+\]", "", key).removesuffix(" key")
