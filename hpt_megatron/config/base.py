"""Typed configuration: nested dataclasses loaded from YAML with dotted overrides.

OmegaConf loads the YAML, merges it over the defaults, applies ``key.sub=value`` overrides and
resolves interpolations (``${run.name}``, ``${oc.env:VAR}``); ``from_dict`` then builds the typed
tree from the plain result: it checks every value against the dataclass type hints (``Literal``
included, which OmegaConf's structured configs cannot express), rejects unknown keys (naming the
closest valid one) and calls each section's ``validate()``. This is the one type checker: the
algorithm options are a section of the same tree. Errors are ``ConfigError`` (a ``ValueError``)
whose message starts with the full dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A user error in a configuration: the message names the dotted key.

    Several problems found at once (a dry run's) are given as several arguments: ``problems``
    lists them, the message is one line each.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _closest(name: str, options: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix + '.' if prefix else ''}{match[0]}'?"
    return f"; valid keys here: {', '.join(options)}"


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (converting int->float and str->Path), or raise.

    One checker per kind of type: unions (``X | None`` included), ``Literal``, lists and tuples,
    mappings, nested sections (dataclasses) and plain classes.

    Raises:
        ConfigError: ``"<key>: <why>"``.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, key)
    if origin is typing.Literal:
        return _check_literal(value, tp, key)
    if origin in (list, tuple):
        return _check_sequence(value, tp, key)
    if origin is dict or tp is dict:
        return _check_mapping(value, tp, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _check_section(value, tp, key)
    return _check_plain(value, tp, key)


def _check_union(value: Any, tp: Any, key: str) -> Any:
    """The first member that accepts ``value``; one member's error when only one could."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return check_value(value, arg, key)
        except ConfigError as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{key}: {value!r} matches none of {tp}")


def _check_literal(value: Any, tp: Any, key: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed:
        match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")
    return value


def _check_sequence(value: Any, tp: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list or tuple of ``tp``'s first item type, as ``tp``'s kind of sequence."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    (item_tp, *_) = typing.get_args(tp) or (Any,)
    items = [check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return items if typing.get_origin(tp) is list else tuple(items)


def _check_mapping(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
    _, val_tp = typing.get_args(tp) or (Any, Any)
    return {k: check_value(v, val_tp, f"{key}.{k}") for k, v in value.items()}


def _check_section(value: Any, tp: type[T], key: str) -> T:
    """A nested section: the section itself, or a mapping built into it (``from_dict``)."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
    return from_dict(tp, value, prefix=key)


def _check_plain(value: Any, tp: Any, key: str) -> Any:
    """A value of a plain class (an int is a float, a str a Path; a bool is no number)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type):
        if tp in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got bool {value!r}")
        if not isinstance(value, tp):
            got = type(value).__name__
            raise ConfigError(f"{key}: expected {tp.__name__}, got {got} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, recursively, then validate it.

    A section may declare ``ALIASES = {field: {spelling: value}}``: accepted spellings of a
    value, replaced before the type check.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    aliases: dict[str, dict[Any, Any]] = getattr(cls, "ALIASES", {})
    problems = [  # unknown keys first: a typo is the likeliest mistake
        f"unknown key '{key}'{_closest(name, sorted(fields), prefix)}"
        for name in data
        if name not in fields
        for key in [f"{prefix}.{name}" if prefix else name]
    ]
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if name in aliases and isinstance(value, str):
            value = aliases[name].get(value, value)
        try:
            kwargs[name] = check_value(value, hints[name], key)
        except ConfigError as err:  # every field's problem, not only the first
            problems += err.problems
    if problems:
        raise ConfigError(*problems)
    obj = cls(**kwargs)
    validate_tree(obj, prefix, recurse=False)
    return obj


def validate_tree(obj: Any, prefix: str = "", recurse: bool = True) -> None:
    """Call ``validate()`` on ``obj`` (and nested sections), prefixing errors with the key.

    The problems of every nested section are raised together; ``obj``'s own ``validate()`` runs
    only when its sections are valid (it may rely on them)."""
    problems = []
    if recurse:
        for f in dataclasses.fields(obj):
            child = getattr(obj, f.name)
            if dataclasses.is_dataclass(child):
                try:
                    validate_tree(child, f"{prefix}.{f.name}" if prefix else f.name)
                except ConfigError as err:
                    problems += err.problems
    if problems:
        raise ConfigError(*problems)
    check = getattr(obj, "validate", None)
    if check is None:
        return
    try:
        check()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{err}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-serialisable form of a config tree (a section with ``OMIT_NONE`` leaves out
    its ``None`` fields: the algorithm options that keep the preset's value; fields the loader
    does not read, ``init=False``, are derived and left out)."""
    if dataclasses.is_dataclass(obj):
        omit = getattr(obj, "OMIT_NONE", False)
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        return {k: to_dict(v) for k, v in values.items() if not (omit and v is None)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    first = str(err).split("\n")[0]
    hint = " (interpolations name the full key, e.g. ${run.name})" if "key" in first else ""
    return ConfigError(f"{key + ': ' if key else ''}{first}{hint}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'trainer.lr=1e-6'`` -> (['trainer', 'lr'], 1e-06). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key = text.split("=", 1)[0]
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    node: Any = _dotlist([text])
    path = key.split(".")
    for part in path:
        node = node[part]
    return path, node


def _dotlist(overrides: list[str]) -> dict[str, Any]:
    try:
        parsed = OmegaConf.from_dotlist(overrides)
        return OmegaConf.to_container(parsed, resolve=False)  # type: ignore[return-value]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None


def load_yaml(path: str | Path) -> DictConfig:
    """Read a YAML mapping (interpolations left unresolved)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping, got a list")
    return data


def merge_and_resolve(
    defaults: dict[str, Any], path: str | Path | None, overrides: list[str]
) -> dict[str, Any]:
    """``defaults``, then the file, then the dotted overrides, merged and resolved to plain data.

    Keys the user wrote come first (at every level), so that ``from_dict`` reports a problem in
    what was written before one in a section left at its defaults.
    """
    for text in overrides:
        parse_override(text)  # a malformed one is named by itself
    written = [load_yaml(path)] if path is not None else []
    written.append(OmegaConf.create(_dotlist(overrides)))
    try:
        user = OmegaConf.to_container(OmegaConf.merge(*written), resolve=False)
        merged = OmegaConf.merge(OmegaConf.create(defaults), *written)
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err) from None
    return _written_first(resolved, user)  # type: ignore[arg-type]


def _written_first(data: dict[str, Any], written: Any) -> dict[str, Any]:
    if not isinstance(written, dict):
        return data
    order = [k for k in written if k in data] + [k for k in data if k not in written]
    return {
        k: _written_first(data[k], written.get(k)) if isinstance(data[k], dict) else data[k]
        for k in order
    }


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
