"""Run folders: where a stage writes, how it is made complete, and what it records.

A stage works in `<output_dir>.partial/` (checkpoints, metrics.jsonl, TensorBoard events, the model)
and only when everything is written and verified is that folder renamed to `<output_dir>`. So a run
folder that exists is complete, and a crash leaves at most a `.partial` folder to resume from.

Layout of a finished run folder:
    recipe.yaml      the fully resolved recipe (re-runnable as is)
    manifest.json    stage, recipe, versions, git commit, input hashes, data counts, final metrics, wall time
    metrics.jsonl    one JSON object per logged step, flat `group/name` keys
    tb/<project>/    TensorBoard event files (`train.report_to`, see rlhf.tracking)
    model/           HF-loadable model or peft adapter, with the tokenizer
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf.config import dump_yaml, recipe_hash, to_dict
from rlhf.errors import UserError
from rlhf.recipes import PARENT_STAGES

MANIFEST = "manifest.json"
LOCK = ".lock"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
            "huggingface_hub", "trl", "numpy")


# ---------------------------------------------------------------------------------------------
# small helpers


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


def hash_input(path_or_id: str) -> dict:
    """Identify an input: a run folder by its manifest, a file or folder by content, else a hub id."""
    p = Path(path_or_id)
    if (p / MANIFEST).is_file():
        return {"path": str(p.resolve()), "kind": "run", "sha256": sha256_file(p / MANIFEST)}
    if p.is_file():
        return {"path": str(p.resolve()), "kind": "file", "sha256": sha256_file(p)}
    if p.is_dir():
        return {"path": str(p.resolve()), "kind": "folder", "sha256": sha256_tree(p)}
    return {"hub_id": path_or_id, "kind": "hub"}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_manifest(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"broken manifest ({err.msg})", f"{path}:{err.lineno}") from None


def expect_run(path: str, stages: set[str], key: str) -> dict | None:
    """If `path` is a run folder, check its stage is one of `stages`; return its manifest (None if not a run)."""
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("stage") not in stages:
        raise UserError(f"{path} is a '{manifest.get('stage')}' run folder; expected a run of stage "
                        f"{' or '.join(sorted(stages))}", None, key)
    return manifest


def check_parents(recipe) -> None:
    """Every run folder the recipe names is a run of a stage that may feed this one
    (`rlhf.recipes.PARENT_STAGES`); a mapping value (`eval.models`) is checked entry by entry."""
    for key, stages in PARENT_STAGES.get(recipe.stage, {}).items():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        named = value.items() if isinstance(value, dict) else [(None, value)]
        for name, spec in named:
            if spec:
                expect_run(spec, set(stages), f"{key}.{name}" if name else key)


# ---------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """metrics.jsonl, written by the main process only (trackers such as TensorBoard: `rlhf.tracking`)."""

    def __init__(self, folder: Path, enabled: bool, resume_offset: int | None = None):
        self.path = folder / "metrics.jsonl"
        self.enabled = enabled
        self.last: dict[str, float] = {}
        if not enabled:
            return
        if resume_offset is not None and self.path.exists():
            # drop lines logged after the checkpoint we resume from: they will be logged again
            with open(self.path, "r+b") as f:
                f.truncate(resume_offset)
        elif resume_offset is None and self.path.exists():
            self.path.unlink()

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: _finite_or_none(v) for k, v in metrics.items()}
        self.last.update({k: v for k, v in clean.items() if v is not None})
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")


def _finite_or_none(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------------------------------
# the run folder


class RunFolder:
    """Owns `<output_dir>.partial/` during a stage and moves it to `<output_dir>` when complete.

    Policy (recipe keys `resume`, `overwrite`):
      - `output_dir` exists (a finished run): refuse unless `overwrite=true` (replaced only at the very
        end, so the old run survives a failed new one) or `resume=true` (then `finished` is True and
        the stage returns the existing run untouched).
      - `.partial` holds a checkpoint: resume from it when `resume` is null or true; `resume=false`
        discards it.
    """

    def __init__(self, recipe, is_main: bool = True, wait=None):
        self.recipe = recipe
        self.stage = recipe.stage
        self.final = Path(recipe.output_dir)
        self.partial = self.final.parent / (self.final.name + ".partial")
        self.checkpoints = self.partial / "checkpoints"
        self.is_main = is_main
        self.started = time.time()
        self.finished = False
        self.resolved = to_dict(recipe)
        self.inputs: dict[str, dict] = {}
        self.counts: dict[str, Any] = {}
        self._wait = wait or (lambda: None)

        if (self.final / MANIFEST).is_file():
            old = read_manifest(self.final) or {}
            if recipe.resume and not recipe.overwrite:
                if old.get("recipe_sha256") != self.recipe_hash() or old.get("stage") != self.stage:
                    raise UserError("holds a finished run made from a different recipe; use overwrite=true "
                                    "or another output_dir", str(self.final), "output_dir")
                self.finished = True
                return
            if not recipe.overwrite:
                raise UserError("holds a finished run; pass overwrite=true to replace it or resume=true to "
                                "keep it", str(self.final), "output_dir")
        elif self.final.exists() and any(self.final.iterdir()) and not recipe.overwrite:
            raise UserError("exists and is not a run folder; choose an empty or new output_dir",
                            str(self.final), "output_dir")

        has_checkpoint = self.latest_checkpoint() is not None
        self.resuming = has_checkpoint and recipe.resume is not False
        if recipe.resume and not has_checkpoint and self.is_main:
            print(f"resume=true: no checkpoint in {self.partial}; starting from the beginning", file=sys.stderr)
        if self.is_main:
            self._check_lock()
            if self.partial.exists() and not self.resuming:
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True, exist_ok=True)
            (self.partial / LOCK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        self._wait()

    def _check_lock(self) -> None:
        """Refuse to share `.partial` with a live run of this host (a stale lock of a killed run is fine)."""
        lock = self.partial / LOCK
        if not lock.is_file():
            return
        try:
            host, pid = lock.read_text().split()
            alive = host == socket.gethostname() and int(pid) != os.getpid() and _pid_alive(int(pid))
        except (ValueError, OSError):
            alive = False
        if alive:
            raise UserError(f"another run (pid {pid}) is writing {self.partial}; wait for it or choose another "
                            f"output_dir", None, "output_dir")

    def recipe_hash(self) -> str:
        """sha256 of the resolved recipe without `resume`/`overwrite` (what the run's results depend on)."""
        return recipe_hash({k: v for k, v in self.resolved.items() if k not in ("resume", "overwrite")})

    @staticmethod
    def discard_failed(recipe) -> None:
        """After an error: remove `.partial` unless it holds a checkpoint worth resuming from."""
        partial = Path(recipe.output_dir).parent / (Path(recipe.output_dir).name + ".partial")
        ckpts = partial / "checkpoints"
        try:
            ours = (partial / LOCK).read_text().split() == [socket.gethostname(), str(os.getpid())]
        except OSError:
            ours = False  # not created by this process: leave it alone
        if ours and not (ckpts.is_dir() and any(ckpts.glob("step-*/state.json"))):
            shutil.rmtree(partial, ignore_errors=True)

    # --- checkpoints -------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step-") and
                      (p / "state.json").is_file())
        return done[-1] if done else None

    def check_resume_recipe(self, saved_sha: str) -> None:
        if saved_sha != self.recipe_hash():
            raise UserError(f"{self.partial} holds a checkpoint of a different recipe; pass resume=false to "
                            f"start over or change output_dir", None, "resume")

    # --- finishing ---------------------------------------------------------------------------

    def input(self, name: str, path_or_id: str | None) -> None:
        """Record an input (data file, parent run, hub id) by hash in the manifest; None is skipped."""
        if self.is_main and path_or_id:
            self.inputs[name] = hash_input(path_or_id)

    def finish(self, metrics: dict, extra: dict | None = None, derived: dict | None = None) -> Path:
        """Write recipe.yaml + manifest.json, drop checkpoints and move `.partial` into place."""
        if self.is_main:
            (self.partial / "recipe.yaml").write_text(dump_yaml(self.resolved))
            manifest = {
                "stage": self.stage,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "wall_time_s": round(time.time() - self.started, 2),
                "recipe_sha256": self.recipe_hash(),
                "recipe": self.resolved,
                "derived": derived or {},
                "versions": package_versions(),
                "git": git_commit(),
                "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
                "inputs": self.inputs,
                "data": self.counts,
                "metrics": {k: _finite_or_none(v) for k, v in metrics.items()},
                **(extra or {}),
            }
            if (self.partial / "model").is_dir():
                manifest["model_sha256"] = sha256_tree(self.partial / "model")
            write_json_atomic(self.partial / MANIFEST, manifest)
            if self.checkpoints.exists():
                shutil.rmtree(self.checkpoints)
            (self.partial / LOCK).unlink(missing_ok=True)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            old = None
            if self.final.exists():
                old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                os.replace(self.final, old)
            os.replace(self.partial, self.final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self._wait()
        return self.final
