"""Files a run writes: atomic writes that never follow a link, content hashes, the environment a run records.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf.errors import UserError


PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
            "huggingface_hub", "trl", "numpy")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """One hash over a folder: relative paths and file contents, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode())
        h.update(sha256_file(file).encode())
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a new temp file and a rename: never half-written, and never written through a
    symbolic link (a link at `path` is replaced, not followed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a killed write, or a planted link: removed, never followed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def open_own(path: Path, flags: int, key: str = "output_dir") -> int:
    """Open a file of the run for writing: never through a symbolic link, a FIFO, a device or a hard link (a file
    with other names may be someone else's file: writing it would change that file too). Checked on the open
    descriptor, before anything is written; a refusal is one line naming the path."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"cannot open {path}: {err.strerror or err} (a run's file is a plain file; remove what is "
                        f"there)", None, key) from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a plain file (a FIFO, socket or device)"
    elif info.st_nlink > 1:
        problem = f"has {info.st_nlink} hard links: it is also a file elsewhere, which writing it would change"
    if problem:
        os.close(fd)
        raise UserError(f"{path} {problem}; a run writes only its own files: remove it", None, key)
    return fd


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict | None:
    """Commit of the project's source tree (and whether it had uncommitted changes)."""
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None
