"""Typed dataclass configs from YAML files and `key=value` overrides; unknown keys are errors."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from satic.errors import SaticError
from satic.io import require_file

T = TypeVar("T")


class _WrittenInt(int):
    """An integer of a config file or override that keeps its text: a string option takes the text as written
    (`out_dir: 010` is the folder 010, not 8, and `12:30` is not YAML 1.1's 750)."""

    written: str


class _WrittenFloat(float):
    """A float that keeps its text, as _WrittenInt (`1.10` stays 1.10, not 1.1)."""

    written: str


def _check_spelling(value: Any, where: str) -> None:
    """Refuse a number YAML 1.1 reads otherwise than it looks: 010 is 8 (octal), 1:30 is 90 (base 60)."""
    written = getattr(value, "written", "")
    digits = written.replace("_", "")
    octal = re.fullmatch(r"[-+]?0[0-7]+", digits) is not None and int(digits, 10) != value  # 07 is 7 either way
    if octal or ":" in written:
        kind, how = ("an octal number", "its leading 0") if octal else ("a base-60 number", "colons")
        raise SaticError(f"{where}: YAML reads {written} as {kind}, {_plain(value)}; write the number meant without "
                         f"{how}")


def _plain(value: Any) -> Any:
    """`value` as a plain int or float when it is a number that keeps its text."""
    if isinstance(value, _WrittenInt):
        return int(value)
    if isinstance(value, _WrittenFloat):
        return float(value)
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation, converting the few safe cases (int -> float)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return _plain(value)
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
        return _plain(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SaticError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if value is None:  # a section whose lines are all commented out, as for a dataclass section below
            value = {}
        if not isinstance(value, dict):
            raise SaticError(f"{where}: expected a mapping, got {value!r}")
        return {_plain(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if value is None:  # a YAML section whose lines are all commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise SaticError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where, _section=True)
    if annotation is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise SaticError(f"{where}: expected a number, got {value!r}")
        _check_spelling(number, where)
        try:
            number = float(number)
        except OverflowError:
            raise SaticError(f"{where}: expected a finite number, got an integer beyond any float") from None
        if not math.isfinite(number):  # .nan, .inf, 1e400: no option means them; a run would go on with NaN
            raise SaticError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is int:  # numpy's integers too (a value read from an array)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SaticError(f"{where}: expected an integer, got {value!r}")
        _check_spelling(value, where)
        return int(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SaticError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            quote = (" (YAML reads yes, no, on, off, true and false as booleans: quote the text, e.g. 'no')"
                     if isinstance(value, bool) else "")
            raise SaticError(f"{where}: expected a string, got {value!r}{quote}")
        return getattr(value, "written", str(value))  # a number as the file or override wrote it
    return _plain(value)


def from_dict(cls: type[T], data: dict, where: str = "config", complete: bool = False, _section: bool = False) -> T:
    """Build dataclass `cls` from a (nested) dict; unknown or mistyped keys raise SaticError, and so do
    missing ones when `complete` (a saved config must not pick up today's defaults).

    A section's own checks (ValueErrors of its __post_init__, which name the dotted key) are reported
    against the outermost `where`, the config file: "FILE: eval.beam_size must be >= 1"."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers or booleans (yes:, 1:) too
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
        return key.split("."), _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise SaticError(f"override {item!r}: cannot parse value ({err})") from err


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) to a nested dict, returning a new one. A mapping given
    for a section is merged into it, as its keys one by one would be (`optim={lr: 0.1}` is `optim.lr=0.1`): the
    section's other keys keep the file's values, not the defaults."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        (*parents, leaf), value = parse_override(item)
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SaticError(f"override {item!r}: {part} is not a section")
        node[leaf] = _merged(node.get(leaf), value)
    return data


def _merged(old: Any, new: Any) -> Any:
    """`new` over `old`: mappings key by key, at every depth; anything else replaces."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{key: _merged(old.get(key), value) for key, value in new.items()}}


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
    _check_override_value(cls, parts, value, item)


def _check_override_value(cls: type, parts: list, value: Any, item: str) -> None:
    """`value` against the field `parts` names. A mapping given for a section is merged into it (apply_overrides),
    so each of its keys is checked as its dotted override would be: the section's own checks, which need the
    merged whole (`scst={cider_weight: 0}` beside the file's bleu_weight), are left to from_dict."""
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
    if value is None and (dataclasses.is_dataclass(annotation) or typing.get_origin(annotation) is dict):
        dotted = ".".join(map(str, parts))
        raise SaticError(f"override {item!r}: {dotted} is a section, which null would reset to its defaults, dropping "
                         f"what the config file sets there; set its keys one by one ({dotted}.KEY=VALUE)")
    if _dataclass_in(annotation) is not None and isinstance(value, dict):
        for key, inner in value.items():
            _check_override_value(cls, [*parts, key], inner, item)
        return
    try:
        _coerce(value, annotation, f"override {item!r}")
    except ValueError as err:  # a section's own check: a message, not a traceback
        raise SaticError(f"override {item!r}: {err}") from None


class _Refused(yaml.YAMLError):
    """YAML that satic will not read (a key given twice, aliases or nesting past any config): its message is the
    reason, shown after the file's name."""


MAX_CONFIG_VALUES = 100_000  # what a config's aliases may expand to: the shipped configs hold about 100 values


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML's own rule; PyYAML keeps the
    last silently, which would hide a typo's effect). Keys a merge (<<: *anchor) brings in may be overridden.
    Numbers keep their text (_WrittenInt, _WrittenFloat), and dates stay text: no option is a date, and
    `out_dir: 2024-05-01` names a folder."""

    def construct_written_int(self, node: yaml.ScalarNode) -> _WrittenInt:
        number = _WrittenInt(self.construct_yaml_int(node))
        number.written = node.value
        return number

    def construct_written_float(self, node: yaml.ScalarNode) -> _WrittenFloat:
        number = _WrittenFloat(self.construct_yaml_float(node))
        number.written = node.value
        return number

    def construct_document(self, node: yaml.Node):
        self._check_unique_keys(node, set())  # on the tree as written, before merges are flattened into it
        if self._expanded_size(node, {}) > MAX_CONFIG_VALUES:  # a "billion laughs": aliases of aliases
            raise _Refused(f"its aliases (*name) expand to more than {MAX_CONFIG_VALUES:,} values; write the values "
                          f"out, or refer to fewer")
        return super().construct_document(node)

    def _expanded_size(self, node: yaml.Node, sizes: dict[int, float]) -> float:
        """How many values `node` stands for with every alias in it written out (inf for one that holds itself)."""
        if id(node) not in sizes:
            sizes[id(node)] = math.inf  # until its children are counted: an alias back to it is a loop
            children = ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            total = 1.0
            for child in children:
                total += self._expanded_size(child, sizes)
                if total > MAX_CONFIG_VALUES:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

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
                            raise _Refused(f"key {key_node.value!r} is given twice (lines {lines}); keep one")
                        first[key] = key_node
                self._check_unique_keys(value_node, seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._check_unique_keys(item, seen_nodes)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_written_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_written_float)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", _UniqueKeyLoader.construct_scalar)


def _load_yaml(text: str, name: str | None = None) -> Any:
    """One YAML document read with _UniqueKeyLoader; `name` is the file YAML's messages point into."""
    loader = _UniqueKeyLoader(text)
    if name is not None:
        loader.name = name  # not "<unicode string>"
    try:
        return loader.get_single_data()
    except RecursionError:
        raise _Refused("its lists or mappings nest too deeply for Python to read; no config nests more than a few "
                       "levels") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = require_file(path, "config file")
    try:
        data = _load_yaml(path.read_bytes().decode("utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise SaticError(f"config file {path} is not UTF-8 text ({err}); give a YAML file") from err
    except _Refused as err:
        raise SaticError(f"config file {path}: {err}") from err
    except yaml.YAMLError as err:
        tabs = "; indent with spaces: YAML does not allow tabs" if "found character '\\t'" in str(err) else ""
        raise SaticError(f"config file {path} is not valid YAML: {err}{tabs}") from err
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


def find_config(path: str | Path) -> Path:
    """The config file at `path`; where there is none, the config shipped with satic that a relative `path` names
    (`coco/teacher_xe.yaml`, or the repository's `configs/coco/teacher_xe.yaml` run outside the checkout)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped = configs_dir().joinpath(*parts) if parts else None
    if shipped is not None and shipped.is_file() and shipped.suffix in (".yaml", ".yml"):
        return shipped
    names = sorted(str(f.relative_to(configs_dir())) for f in configs_dir().glob("*/*.yaml"))
    raise SaticError(f"config file not found: {path}; give the path of a YAML config, or the name of one that satic "
                     f"ships ({', '.join(names[:3])}, ...: {len(names)} in {configs_dir()})")
