"""Typed recipes: YAML -> dataclasses, with dotted overrides and one-line errors.

A recipe section is a dataclass whose fields are declared with `opt(default, help)` or `req(help)`.
`build()` turns a plain dict (from YAML) into the dataclass, checking every key: unknown keys, wrong
types, missing required values and out-of-range numbers raise `RecipeError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rlhf.errors import RecipeError

_MISSING = dataclasses.MISSING
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_NONFINITE_RE = re.compile(r"^[+-]?(\.?inf(inity)?|\.?nan)$", re.IGNORECASE)


def opt(default: Any, help: str, *, gt: float | None = None, ge: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A recipe field with a default, a one-line help and optional numeric bounds."""
    meta = {"help": help, "gt": gt, "ge": ge, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested section that is present by default (filled with its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def req(help: str, **bounds: float) -> Any:
    """A required recipe field (no default)."""
    return dataclasses.field(metadata={"help": help, **{k: bounds.get(k) for k in ("gt", "ge", "le", "lt")}})


# ---------------------------------------------------------------------------------------------
# type checking of one value


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + " or null" if len(args) < len(get_args(tp)) else name
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return `value` checked against type `tp` (ints widen to floats, numeric strings become floats)."""
    origin = get_origin(tp)
    bad = RecipeError(f"expected {_type_name(tp)}, got {excerpt(value)}", where, key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except RecipeError as err:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise err  # a section with a bad key inside: report that key, not the union
                if arg is float and _nonfinite(value):
                    raise err  # "must be finite" says more than "expected a number or null"
        raise bad
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(v, get_args(tp)[1], f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, where, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if _nonfinite(value):  # YAML `.inf`/`.nan`, `1e999`, or `inf` from the command line
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise RecipeError(f"must be a finite number, got {shown}", where, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` as a string
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported recipe field type {tp!r} at {key}")


def _nonfinite(value: Any) -> bool:
    """inf or nan as a float, or a value that would become one (`inf`, `.nan`, `1e999`, a 400-digit int)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:  # an integer beyond the float range
            return True
    if isinstance(value, str):
        text = value.strip()
        return bool(_NONFINITE_RE.match(text)) or (bool(_FLOAT_RE.match(text)) and not math.isfinite(float(text)))
    return False


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = [("gt", lambda v, b: v > b, "greater than"), ("ge", lambda v, b: v >= b, "at least"),
              ("lt", lambda v, b: v < b, "less than"), ("le", lambda v, b: v <= b, "at most")]
    for name, ok, words in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise RecipeError(f"must be {words} {_number(bound)}, got {_number(value)}", where, key)


def _number(value: int | float) -> str:
    """A bound or value for an error line: integers exactly (a seed bound of 4294967295, not 4.29e+09),
    integers too long to read shortened, floats as %g."""
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= 20 else f"{text[:8]}...({len(text)} digits)"
    return f"{value:g}"


_SIZE_RE = re.compile(r"^(\d+)(GiB|MiB|KiB|GB|MB|KB)$", re.IGNORECASE)
_SIZE_UNITS = {"GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10, "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3}


def parse_size(text: str) -> int | None:
    """Bytes in a size like '5GB' or '500MiB', as transformers reads `max_shard_size` (a lowercase final
    'b' of GB/MB/KB means bits); None when `text` is not such a size."""
    match = _SIZE_RE.match(text)
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    size = number * _SIZE_UNITS[unit.upper()]
    return size // 8 if unit.endswith("b") and not unit.upper().endswith("IB") else size


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def build(cls: type, data: dict | None, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; every problem raises RecipeError naming the dotted key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "RENAMED", {})
    for name in data:
        if name in renamed:
            raise RecipeError(f"renamed to '{_join(prefix, renamed[name])}'", where, _join(prefix, str(name)))
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise RecipeError(f"unknown key{hint}", where, _join(prefix, str(name)))
    values = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            value = _coerce(data[name], hints[name], key, where)
            _check_bounds(value, f.metadata, key, where)
            values[name] = value
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise RecipeError(f"missing required value ({f.metadata.get('help', '')})", where, key)
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except RecipeError as err:  # validate() names keys relative to its section
            raise RecipeError(err.message, where, _join(prefix, err.key or "")) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (field order kept) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def excerpt(value: Any, limit: int = 60, quote: bool = True) -> str:
    """A value as an error line shows it: its repr (or str), cut to `limit` characters with how much was cut."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


# ---------------------------------------------------------------------------------------------
# files and overrides


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"duplicate key {key!r}")


class TooLarge(yaml.YAMLError):
    """A YAML document whose aliases expand beyond `MAX_VALUES` values (an alias bomb), or refer to themselves."""

    def __init__(self, problem: str, line: int):
        self.problem, self.line = problem, line
        super().__init__(problem)


MAX_VALUES = 100_000  # a recipe has a few hundred; a 600-byte alias bomb expands to billions


def _expanded_size(root: yaml.Node) -> int:
    """How many values a composed document holds once every alias is expanded (each shared node counted as often as
    it is referred to, computed once per node, so the bomb is measured without being expanded)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if not children_done:
            if id(node) in visiting:
                raise TooLarge("an alias refers to the collection that contains it", node.start_mark.line + 1)
            visiting.add(id(node))
            stack.append((node, True))
            for child in children:
                if id(child) in visiting and id(child) not in sizes:
                    raise TooLarge("an alias refers to the collection that contains it", child.start_mark.line + 1)
                stack.append((child, False))
            continue
        sizes[id(node)] = size = 1 + sum(sizes[id(c)] for c in children)
        if size > MAX_VALUES:
            raise TooLarge(f"its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?)",
                           node.start_mark.line + 1)
    return sizes[id(root)]


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: PyYAML would keep
    the last value silently, so `lr: 1e-4` ... `lr: 1e-3` would train with whichever came last; and a document
    whose aliases expand beyond `MAX_VALUES` values is refused before anything is built from it."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no tags that build objects), refusing duplicate keys (`DuplicateKey`)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    """Read a recipe file (safe YAML, no duplicate keys); a missing, unreadable or broken file is a
    one-line error."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", str(path))
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKey as err:
        raise RecipeError(f"duplicate key (first given on line {err.first_line}); YAML would silently keep "
                          f"only the last value", f"{path}:{err.line}", excerpt(err.key, quote=False)) from None
    except TooLarge as err:
        raise RecipeError(f"refused: {err.problem}", f"{path}:{err.line}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"invalid YAML: {getattr(err, 'problem', err)}", where) from None
    except UnicodeDecodeError:
        raise RecipeError("recipe is not UTF-8 text", str(path)) from None
    except OSError as err:  # permissions, a folder of that name, a broken network mount
        raise RecipeError(f"cannot read: {err.strerror or err}", str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of sections", str(path))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> set[str]:
    """Apply `a.b.c=value` strings to the raw recipe dict in place (values parsed as YAML).

    Returns the set of overridden dotted keys so errors about them can name the command line.
    """
    touched = set()
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {excerpt(item)} is not of the form key=value", "command line")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {excerpt(item)} has an empty key", "command line")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except DuplicateKey as err:
            raise RecipeError(f"duplicate key {excerpt(err.key)} in {excerpt(raw)}", "command line", key) from None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{'.'.join(parts[:i + 1])} is not a section", "command line", key)
            node = child
        node[parts[-1]] = value
        touched.add(key)
    return touched


def recipe_hash(resolved: dict) -> str:
    """sha256 of the canonical JSON of a resolved recipe (what the run depended on)."""
    blob = json.dumps(resolved, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def dump_yaml(resolved: dict) -> str:
    return yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, allow_unicode=True)


def describe(cls: type, prefix: str = "", depth: int = 0) -> list[str]:
    """Recipe reference: one line per field with its type, default and help (for `rlhf STAGE --help`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        sub = [a for a in (get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if sub:
            lines.append(f"{'  ' * depth}{key}:  {f.metadata.get('help', '')}")
            lines += describe(sub[0], key, depth + 1)
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "REQUIRED"
        lines.append(f"{'  ' * depth}{key} = {default!r}  ({_type_name(tp)})  {f.metadata.get('help', '')}")
    return lines
