"""Read raw records from JSON / JSONL / parquet files, folders of them, or `datasets` hub ids.

Every record keeps where it came from (`file:line`, or `file:row N` / `hub-id[split]:row N`), so that
validation errors can point at it. A folder's files are matched by suffix whatever its case; files of
other types are listed in a warning, and a subfolder that cannot be read is an error (not a silent gap).
JSON that the parser rejects in any way (numbers beyond its digit limit, nesting beyond the recursion
limit) and text that is not valid Unicode (lone surrogates such as "\\ud800") are errors naming the line.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import DataError, UserError, warn

SUFFIXES = (".jsonl", ".json", ".parquet")
SHOWN_UNKNOWN = 5  # file names listed in the warning about a folder's files of unknown type


@dataclass
class Raw:
    where: str  # "file:line" or "source:row N"
    data: dict


class Invalid:
    """Collects (or raises) record problems according to `skip_invalid`."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.first: str | None = None

    def __call__(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.count += 1
        self.first = self.first or err.line()


def read_records(spec: str, split: str, invalid: Invalid, key: str) -> list[Raw]:
    """All records of a data source (see module doc)."""
    if not spec.strip():  # Path("") is the current folder: never read that by accident
        raise UserError("is empty; give a data file, a folder of them or a hub dataset id", None, key)
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path, invalid)
    if path.is_dir():
        files = data_files(path, key)
        if not files:
            raise UserError(f"folder {spec} holds no {'/'.join(SUFFIXES)} files", None, key)
        return [r for f in files for r in _read_file(f, invalid)]
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.suffix.lower() in SUFFIXES:
        raise UserError(f"data file {spec} not found", None, key)
    return _read_hub(spec, split, key)


def data_files(folder: Path, key: str) -> list[Path]:
    """The data files under `folder` (any depth, suffix of any case), in path order. Files of other types
    are listed in one warning; a subfolder that cannot be read is an error."""
    def unreadable(err: OSError):
        raise UserError(f"cannot read folder {err.filename}: {err.strerror or err}", None, key)

    found, unknown = [], []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            (found if path.suffix.lower() in SUFFIXES else unknown).append(path)
    if unknown:
        names = ", ".join(str(p.relative_to(folder)) for p in unknown[:SHOWN_UNKNOWN])
        more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
        warn(f"{key}: {folder} holds {len(unknown)} file(s) of unknown type, not read: {names}{more} "
             f"(data files end in {'/'.join(SUFFIXES)})")
    return sorted(found)


def _read_file(path: Path, invalid: Invalid) -> list[Raw]:
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    try:
        blob = path.read_bytes()
    except OSError as err:  # permissions, a broken network mount
        raise DataError(f"cannot read: {err.strerror or err}", str(path)) from None
    if blob.startswith(codecs.BOM_UTF8):
        blob = blob[len(codecs.BOM_UTF8):]  # editors on Windows add it; json.loads refuses it
    # the first non-space byte decides, not the suffix: many `.json` files (HF exports, pandas
    # `to_json(lines=True)`) hold one record per line
    if blob.lstrip()[:1] == b"[":
        return _read_json_array(path, blob, invalid)
    return _read_jsonl(path, blob, invalid)


def _read_jsonl(path: Path, blob: bytes, invalid: Invalid) -> list[Raw]:
    out = []
    for lineno, line in enumerate(blob.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            invalid(DataError(f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})", where))
            continue
        if not text.strip():
            continue
        try:
            obj = parse_json(text, where)
        except DataError as err:
            invalid(err)
            continue
        if not isinstance(obj, dict):
            invalid(DataError(f"expected a JSON object, got {type(obj).__name__}", where))
            continue
        out.append(Raw(where, obj))
    return out


def parse_json(text: str, where: str):
    """One JSON value of a data file. Every way the parser can refuse the text (a decode error, an integer
    beyond its digit limit, nesting beyond its depth), and strings that are not valid Unicode, are a
    DataError at `where`."""
    try:
        return _checked(json.loads(text), where)
    except (ValueError, RecursionError) as err:
        raise _json_error(err, where) from None


def _json_error(err: Exception, where: str) -> DataError:
    """Every way the JSON parser can refuse a text, as one line at `where`."""
    if isinstance(err, json.JSONDecodeError):
        return DataError(f"invalid JSON: {err.msg} (column {err.colno})", where)
    if isinstance(err, RecursionError):
        return DataError("invalid JSON: nested too deeply", where)
    # e.g. "Exceeds the limit (4300 digits) for integer string conversion: ...; use sys.set_int_max_str_digits()"
    first = (str(err).strip().splitlines() or ["rejected by the parser"])[0].split("; use ")[0]
    return DataError(f"invalid JSON: {first}", where)


def _checked(obj, where: str):
    """`obj` unless one of its strings (or keys) is not valid Unicode text: JSON escapes can produce lone
    surrogates ("\\ud800"), which no tokenizer can encode."""
    stack = [(obj, None)]
    while stack:
        value, field = stack.pop()
        if isinstance(value, dict):
            stack += [(k, field or k) for k in value if isinstance(k, str)]
            stack += [(v, field or k) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, field) for v in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataError(f"holds a lone surrogate {value[err.start]!r}: not valid Unicode text", where,
                                field if isinstance(field, str) else None) from None
    return obj


def _read_json_array(path: Path, blob: bytes, invalid: Invalid) -> list[Raw]:
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        line = blob[:err.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{blob[err.start]:02x})", f"{path}:{line}") from None
    decoder = json.JSONDecoder()
    i, n = _skip_ws(text, 0), len(text)
    if i >= n or text[i] != "[":
        raise DataError("expected a JSON list of records", f"{path}:{text.count(chr(10), 0, i) + 1}")
    i = _skip_ws(text, i + 1)
    out, line, counted = [], 1, 0
    while i < n and text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        where = f"{path}:{line}"
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON: {err.msg}", f"{path}:{err.lineno}") from None
        except (ValueError, RecursionError) as err:
            raise _json_error(err, where) from None
        obj = _checked(obj, where)
        if isinstance(obj, dict):
            out.append(Raw(where, obj))
        else:
            invalid(DataError(f"expected a JSON object, got {type(obj).__name__}", where))
        i = _skip_ws(text, end)
        if i < n and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < n and text[i] != "]":
            raise DataError("invalid JSON: expected ',' or ']'", f"{path}:{text.count(chr(10), 0, i) + 1}")
    if i >= n:
        raise DataError("invalid JSON: the list is not closed", f"{path}:{text.count(chr(10)) + 1}")
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_parquet(path: Path) -> list[Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:  # truncated, not parquet, unreadable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read as parquet: {first}", str(path)) from None
    return [Raw(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]


def _read_hub(spec: str, split: str, key: str) -> list[Raw]:
    try:
        import datasets

        ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # datasets raises many types (network, missing split, bad config)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load dataset '{spec}' (split {split}): {first}", None, key) from None
    return [Raw(f"{spec}[{split}]:row {i + 1}", dict(row)) for i, row in enumerate(ds)]
