"""The on-disk cache of prepared data: validated, rendered, tokenized records as memory-mapped Arrow tables.

An entry is a folder `<cache_dir>/<name>-<key>/` holding one Arrow stream file per table (`train.arrow`,
`eval.arrow`, ...) and `meta.json` (the cache layout version, what the key was made of, the manifest counts,
each table's rows, bytes and sha256). The key hashes everything that changes the result: the data files'
content hashes, the tokenizer (its vocabulary, merges, special tokens, chat template), the template, the
length limits and truncation rules, and the encoder version of the stage (`ENCODERS`). A second run with
the same key memory-maps the tables (no record is read, nothing tokenized); any change makes a new key.

An entry is written to `<entry>.tmp-<pid>` and renamed into place only when complete, so a killed
preparation never leaves a half entry. One that fails verification (a table missing, truncated or altered,
or written by another layout version) is reported in one line and prepared again, never trusted. Under
`accelerate launch`, the first process of each machine prepares while the others wait, then all
memory-map the same files (the page cache holds them once per machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from rlhf.errors import UserError, warn
from rlhf.files import sha256_file

VERSION = 1  # layout of an entry (files, meta.json); an entry of another version is prepared again
ENV = "RLHF_DATA_CACHE"  # overrides the default folder; `data.cache_dir` overrides both
KEY = "data.cache_dir"


def cache_root(setting: str | None) -> Path:
    """`data.cache_dir`, else $RLHF_DATA_CACHE, else `rlhf/data` under the user's cache folder (like the
    hub's: $XDG_CACHE_HOME or ~/.cache)."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rlhf" / "data"


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cache folder {root} is not writable ({err.strerror or err}); set {KEY} or ${ENV} "
                        f"to a folder you can write", None, KEY) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes token ids: the fast tokenizer's full definition
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens), its special tokens and
    chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary with ids
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps([specials, ids, tokenizer.chat_template, getattr(tokenizer, "padding_side", None)],
                        default=str).encode())
    return h.hexdigest()


def source_fingerprint(spec: str | None, split: str | None = None) -> object:
    """The content of a data source: a file's sha256, a folder's files with theirs, a hub dataset's id,
    split and the fingerprint `datasets` gives its prepared files (a new revision changes it)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return {"file": sha256_file(path)}
    if path.is_dir():
        return {"folder": {str(p.relative_to(path)): sha256_file(p)
                           for p in sorted(path.rglob("*")) if p.is_file()}}
    try:
        import datasets

        return {"hub": spec, "split": split, "fingerprint": datasets.load_dataset(spec, split=split)._fingerprint}
    except Exception:  # reading it reports the error with its recipe key
        return {"hub": spec, "split": split}


def entry_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Writer:
    """Appends record batches to an entry's tables while it is prepared (Arrow IPC stream files, the format
    `datasets.Dataset.from_file` memory-maps)."""

    def __init__(self, folder: Path):
        self.folder, self._open = folder, {}

    def write(self, table: str, batch) -> None:
        import pyarrow as pa

        if table not in self._open:
            sink = pa.OSFile(str(self.folder / f"{table}.arrow"), "wb")
            self._open[table] = (sink, pa.ipc.new_stream(sink, batch.schema))
        self._open[table][1].write_batch(batch)

    def close(self) -> list[str]:
        for sink, writer in self._open.values():
            writer.close()
            sink.close()
        return list(self._open)


def _tables_meta(folder: Path, names: list[str]) -> dict:
    from datasets import Dataset

    out = {}
    for name in names:
        file = folder / f"{name}.arrow"
        out[name] = {"rows": len(Dataset.from_file(str(file), in_memory=False)), "bytes": file.stat().st_size,
                     "sha256": sha256_file(file)}
    return out


def _verify(folder: Path, parts: dict):
    """(tables, meta) of a complete, untouched entry; else (None, why it is not trusted)."""
    from datasets import Dataset

    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return None, f"its meta.json cannot be read ({type(err).__name__})"
    if meta.get("version") != VERSION:
        return None, f"it was written by another version of this code (cache layout {meta.get('version')}, " \
                     f"this is {VERSION})"
    if meta.get("parts") != json.loads(json.dumps(parts, sort_keys=True, default=str)):
        return None, "its key does not match what it was made from"
    tables = {}
    for name, info in meta.get("tables", {}).items():
        file = folder / f"{name}.arrow"
        if not file.is_file() or file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
            return None, f"{file.name} is missing or altered"
        try:
            tables[name] = Dataset.from_file(str(file), in_memory=False)
        except Exception as err:  # pyarrow raises many types for a damaged stream
            return None, f"{file.name} cannot be read ({type(err).__name__})"
        if len(tables[name]) != info["rows"]:
            return None, f"{file.name} holds {len(tables[name])} rows, not {info['rows']}"
    return tables, meta


@contextlib.contextmanager
def _local_main_first():
    """The first process of each machine runs the block first; the others run it after (then they find the
    entry ready). Without a distributed launch, just runs it."""
    try:
        from accelerate import PartialState

        state = PartialState()
    except Exception:  # no accelerate state can be made: a plain single process
        yield
        return
    with state.local_main_process_first():
        yield


def load_or_build(cache_dir: str | None, name: str, parts: dict, build: Callable[[Writer], dict]):
    """The tables of entry `name` keyed by `parts`: memory-mapped when a verified entry exists, else
    prepared by `build(writer) -> info` (a JSON-able dict kept in meta.json: the manifest counts, ...) and
    then memory-mapped. Returns (tables: {name: datasets.Dataset}, meta: with 'info', and 'cache': the
    entry's folder, its size and whether it was reused)."""
    root = cache_root(cache_dir)
    folder = root / f"{name}-{entry_key(parts)}"
    with _local_main_first():
        _check_writable(root)
        hit = folder.is_dir()
        tables, meta = _verify(folder, parts) if hit else (None, None)
        if tables is None:
            if hit:
                warn(f"{KEY}: cache entry {folder} is not used: {meta}; preparing the data again")
            tables, meta = _build(folder, parts, build)
            hit = False
    size = sum(t["bytes"] for t in meta["tables"].values())
    meta["cache"] = {"entry": str(folder), "bytes": size, "reused": hit}
    return tables, meta


def _build(folder: Path, parts: dict, build: Callable[[Writer], dict]):
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = Writer(tmp)
        try:
            info = build(writer)
        finally:
            names = writer.close()
        meta = {"version": VERSION, "parts": json.loads(json.dumps(parts, sort_keys=True, default=str)),
                "info": info, "tables": _tables_meta(tmp, names)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # an entry that failed verification
        os.replace(tmp, folder)
    except OSError as err:
        raise UserError(f"cannot write the cache entry {folder}: {err.strerror or err}", None, KEY) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tables, why = _verify(folder, parts)
    if tables is None:
        raise UserError(f"the cache entry {folder} just written does not verify: {why}", None, KEY)
    return tables, why


def describe(meta: dict) -> str:
    c = meta["cache"]
    return f"{'reused' if c['reused'] else 'prepared'} {c['entry']} ({c['bytes'] / 1e6:.1f} MB)"
