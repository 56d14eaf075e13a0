"""The one reader of configuration: any (nested) config dataclass from plain YAML/JSON data, checked strictly.

Pretraining recipes, objectives, model configs, evaluation suites, ablation and demo recipes all go through
:func:`build`, so every file gets the same checks: an unknown key names the dotted key, where it came from and
the closest known spelling; a value of the wrong type, or outside a ``Literal[...]`` field's choices, names the
key and what it must be. A typo never runs silently with a default. Errors are one-line ``ConfigError``\\ s.

Edits use the same dotted keys: ``--set key=value`` on the command line (:func:`parse_sets`, the value read as
YAML: ``--set run.precision=fp32``, ``--set objective.mask_rates=[0.15,0.2]``) and :func:`override` in Python.
Inside a free mapping (``model.overrides``, a variant's ``set``) the rest of the key is one key; a list of
named sections (a suite's ``tasks``) is addressed by name (``tasks.SSP-3.training.lr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Iterable, Literal, Mapping, TypeVar

import yaml

from protlm.errors import ConfigError

T = TypeVar("T")
# YAML 1.1 reads exponent notation without a dot (1e-3) as a string; it is a number in every other reader a
# user knows, so a float field accepts it (and only this form).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def build(cls: type[T], data: Any, source: str, prefix: str = "") -> T:
    """Dataclass ``cls`` from nested mappings, every key and value checked; ``source`` (a file, ``--set``) and
    ``prefix`` (the dotted path down to ``data``) name the place in errors."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # init=False fields are not keys
    for key in data:
        if key not in fields:
            raise _unknown(source, prefix, key, list(fields))
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {prefix + name} is required")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(value, hints[key], source, prefix + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the dataclass's own checks; their messages name their keys
        raise ConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {where}: {err}") from None


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``--set key=value`` arguments as ``{dotted key: value}``, each value read as YAML (``1e-3``, ``true``,
    ``[a, b]``, ``{k: v}``); a key given twice keeps its last value, applied in the order of that last one."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None
        changes.pop(key, None)
        changes[key] = value
    return changes


def apply(data: dict[str, Any], changes: Mapping[str, Any], cls: type, source: str = "--set") -> None:
    """Set dotted keys in ``data``, the raw mapping of a ``cls``, in place; the path is checked against ``cls``
    (the values are checked when ``data`` is built). Missing sections on the way are created."""
    for key, value in changes.items():
        node, annotation, parts = data, cls, key.split(".")
        for i, part in enumerate(parts):
            done = ".".join(parts[:i])
            annotation = _unwrap_optional(annotation)
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
            if dataclasses.is_dataclass(annotation):
                names = [f.name for f in dataclasses.fields(annotation) if f.init]
                if part not in names:
                    raise _unknown(source, done + "." if done else "", part, names)
                child = typing.get_type_hints(annotation)[part]
            elif origin is dict and args and _is_section(args[1]):
                child = args[1]
            elif origin is dict:  # a free mapping: the rest of the key is one key (model.overrides.d_model)
                node[".".join(parts[i:])] = value
                break
            elif origin is list and args and dataclasses.is_dataclass(args[0]) and isinstance(node, list):
                match = [j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
                if not match:
                    raise ConfigError(f"{source}: {key}: {done} has no entry named {part!r}")
                part, child = match[0], args[0]
            else:
                raise ConfigError(f"{source}: {key}: {done} is not a section")
            if i == len(parts) - 1:
                node[part] = value
                break
            existing = node[part] if isinstance(node, list) else node.get(part)
            if not isinstance(existing, (dict, list)):  # absent or empty: the edit creates the section
                node[part] = [] if typing.get_origin(_unwrap_optional(child)) is list else {}
            node, annotation = node[part], child


def override(cfg: T, changes: Mapping[str, Any], source: str = "override") -> T:
    """A new config with dotted keys replaced (``{"run.seed": 3, "objective.mask_rates": [0.2]}``), read back
    through :func:`build` exactly as a file would be; ``cfg`` itself is left as it was."""
    data = plain(cfg)
    apply(data, changes, type(cfg), source)
    return build(type(cfg), data, source)


def plain(value: Any) -> Any:
    """A config as the plain data :func:`build` reads back: mappings and lists (tuples too become lists, so a
    YAML dump stays readable); fields that are not keys (``init=False``) are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# --- values --------------------------------------------------------------------------------------------------
def _convert(value: Any, annotation: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None and (dataclasses.is_dataclass(annotation) or origin in (dict, list)):
        value = [] if origin is list else {}  # an empty section (a key with nothing under it) is the defaults
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, source, key + ".")
    if annotation is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg, source, key)
                except ConfigError:
                    pass
        raise _type_error(source, key, annotation, value)
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
            return float(value)
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [value]  # a single path where a list is expected
        if not isinstance(value, (list, tuple)):
            raise _type_error(source, key, annotation, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _type_error(source, key, annotation, value)
            return tuple(_convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, source, _item_key(key, i, v, inner)) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(source, key, annotation, value)
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, source, f"{key}.{k}"): _convert(v, vt, source, f"{key}.{k}") for k, v in value.items()}
    if annotation in (bool, str, int, float):
        raise _type_error(source, key, annotation, value)
    raise ConfigError(f"{source}: {key}: unsupported field type {annotation!r} (a protlm bug)")


def _item_key(key: str, i: int, value: Any, annotation: Any) -> str:
    """Named sections in a list are called by name, as ``--set`` addresses them (``tasks.SSP-3``)."""
    name = value.get("name") if isinstance(value, dict) and dataclasses.is_dataclass(annotation) else None
    return f"{key}.{name}" if isinstance(name, str) else f"{key}[{i}]"


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) or typing.get_origin(annotation) is dict


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _unknown(source: str, prefix: str, key: Any, names: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(str(key), names, n=1)
    return ConfigError(f"{source}: unknown config key {prefix + str(key)!r}"
                       + (f" (did you mean {prefix + hint[0]!r}?)" if hint else ""))


def _type_error(source: str, key: str, annotation: Any, value: Any) -> ConfigError:
    plain_type = isinstance(annotation, type) and typing.get_origin(annotation) is None
    name = annotation.__name__ if plain_type else str(annotation).replace("typing.", "")
    return ConfigError(f"{source}: {key} must be {name}, got {value!r}")
