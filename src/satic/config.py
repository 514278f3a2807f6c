"""Typed dataclass configs from YAML files and `key=value` overrides; unknown keys are errors."""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from satic.errors import SaticError
from satic.io import require_file

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting the few safe cases (int -> float)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except SaticError as err:
                errors.append(str(err))
        raise SaticError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise SaticError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SaticError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SaticError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if value is None:  # a YAML section whose lines are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise SaticError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where, _section=True)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SaticError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:  # numpy's integers too (a value read from an array)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SaticError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SaticError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SaticError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config", complete: bool = False, _section: bool = False) -> T:
    """Build dataclass `cls` from a (nested) dict; unknown or mistyped keys raise SaticError, and so do
    missing ones when `complete` (a saved config must not pick up today's defaults).

    A section's own checks (ValueErrors of its __post_init__, which name the dotted key) are reported
    against the outermost `where`, the config file: "FILE: eval.beam_size must be >= 1"."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SaticError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    missing = sorted(names - set(data)) if complete else []
    if missing:
        raise SaticError(f"{where}: missing key(s) {missing}; every one of {sorted(names)} must be given")
    try:
        return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})
    except (ValueError, TypeError) as err:
        if _section:
            raise
        raise SaticError(f"{where}: {err}") from err


def to_dict(config: Any) -> dict:
    """Plain, JSON/YAML-ready dict of a dataclass config (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SaticError(f"override {item!r} is not of the form key=value")
    try:
        return key.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise SaticError(f"override {item!r}: cannot parse value ({err})") from err


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, returning a new one."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        (*parents, leaf), value = parse_override(item)
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SaticError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return data


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (`Section` or `Section | None`), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)), None)
    return None


def check_override(cls: type, item: str) -> None:
    """Check one `a.b=value` against the field it sets, so a bad one is named as the override it was."""
    parts, value = parse_override(item)
    annotation: Any = cls
    owner: Any = None
    for depth, part in enumerate(parts):
        section = _dataclass_in(annotation)
        if section is None:  # inside a free-form mapping (such as model): its owner may say what it holds
            key_type = getattr(owner, "mapping_key_type", None)
            try:
                annotation = key_type(parts[depth - 1], parts[depth:]) if key_type else None
            except ValueError as err:
                raise SaticError(f"override {item!r}: {err}") from None
            if annotation is None:
                return
            break
        owner = section
        names = sorted(f.name for f in dataclasses.fields(section) if f.init)
        if part not in names:
            inside = f" in section {'.'.join(parts[:depth])}" if depth else ""
            raise SaticError(f"override {item!r}: unknown key(s) {[part]}{inside}; valid keys are {names}")
        annotation = typing.get_type_hints(section)[part]
    _coerce(value, annotation, f"override {item!r}")


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML's own rule; PyYAML keeps the
    last silently, which would hide a typo's effect). Keys a merge (<<: *anchor) brings in may be overridden."""

    def construct_document(self, node: yaml.Node):
        self._check_unique_keys(node, set())  # on the tree as written, before merges are flattened into it
        return super().construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias: checked where its anchor is
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)  # by value: 1 and 0x1, true and yes are one key
                    with contextlib.suppress(TypeError):
                        if key in first:
                            lines = f"{first[key].start_mark.line + 1} and {key_node.start_mark.line + 1}"
                            raise _DuplicateKey(f"key {key_node.value!r} is given twice (lines {lines}); keep one")
                        first[key] = key_node
                self._check_unique_keys(value_node, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._check_unique_keys(item, seen_nodes)


def read_yaml(path: str | Path) -> dict:
    path = require_file(path, "config file")
    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise SaticError(f"config file {path} is not UTF-8 text ({err}); give a YAML file") from err
    except _DuplicateKey as err:
        raise SaticError(f"config file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise SaticError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SaticError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + overrides -> validated dataclass `cls`."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        check_override(cls, item)
    where = str(path) if path is not None else cls.__name__
    return from_dict(cls, apply_overrides(data, list(overrides)), where)


def configs_dir() -> Path:
    """The configs shipped with the package (the repository's configs/ links here)."""
    return Path(__file__).resolve().parent / "configs"
