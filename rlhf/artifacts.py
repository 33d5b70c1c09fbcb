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

What a run never does: replace a folder that is not a finished run of this pipeline, write over, into or
around one of its own inputs, write through a symbolic link planted in its `.partial`, share `.partial`
with another live run (an flock'ed `.lock`), or resume from a checkpoint that is not complete or whose
inputs have changed since.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import json
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from rlhf.checkpoint import newest_complete, read_state
from rlhf.config import dump_yaml, recipe_hash, to_dict
from rlhf.errors import UserError, describe, warn
from rlhf.files import (git_commit, open_own, package_versions, sha256_tree, write_json_atomic,
                        write_text_atomic)
# manifests and the lineage of inputs live in rlhf.lineage; re-exported for the stages and tools that import them here
from rlhf.lineage import (MANIFEST, check_parents, expect_run, hash_input, is_run_manifest, lineage,  # noqa: F401
                          read_manifest)
from rlhf.metrics import finite_or_none
from rlhf.recipes import input_paths

LOCK = ".lock"
OWNER = ".owner.json"  # in `.partial`: which stage and output_dir created it (`RunFolder._check_owner`)


# ---------------------------------------------------------------------------------------------
# the run folder

_HELD: dict[str, int] = {}  # lock file -> descriptor, for the `.partial` folders this process holds


class RunFolder:
    """Owns `<output_dir>.partial/` during a stage and moves it to `<output_dir>` when complete.

    Policy (recipe keys `resume`, `overwrite`):
      - `output_dir` holds a finished run: refuse unless `overwrite=true` (replaced only at the very end,
        so the old run survives a failed new one) or `resume=true` (then `finished` is True and the stage
        returns the existing run untouched). Any other non-empty folder is refused, overwrite or not.
      - `output_dir` (or its `.partial`) may not be, hold, or sit inside an input the recipe names.
      - `.partial` holds a complete checkpoint: resume from it when `resume` is null or true (after checking
        that it holds no symbolic link and, in `input`, that no input changed); `resume=false` discards it.
      - `.partial` holds a run that finished but was killed before the final rename: it is moved into place.
    Only the main process changes anything, under an flock'ed `.partial/.lock`, which the kernel releases
    when the process dies (a stale lock cannot outlive its process, whatever happens to its pid).
    """

    def __init__(self, recipe, is_main: bool = True, wait=None):
        self.recipe = recipe
        self.stage = recipe.stage
        self.final = Path(recipe.output_dir)
        self.partial = self.final.parent / (self.final.name + ".partial")
        self.checkpoints = self.partial / "checkpoints"
        self.is_main = is_main
        self.started = time.time()
        self.resolved = to_dict(recipe)
        self.inputs: dict[str, dict] = {}
        self.counts: dict[str, Any] = {}
        self._wait = wait or (lambda: None)
        self._warned: set[Path] = set()
        self._saved_inputs: dict | None = None

        self._check_places()
        decision = self._decide()  # every process looks before the main one changes anything
        self._wait()
        if self.is_main:
            self._settle(decision)
        self._wait()
        self.finished = decision in ("finished", "pending")
        self.resuming = decision == "resume"

    # --- deciding ------------------------------------------------------------------------------

    def _check_places(self) -> None:
        """output_dir is a folder name, not the working folder, not a file, and no input of the recipe."""
        out = str(self.recipe.output_dir)
        if not out.strip():
            raise UserError("is empty; name the folder the run writes", None, "output_dir")
        final = Path(os.path.abspath(self.final))
        if final == Path.cwd() or final in Path.cwd().parents:
            raise UserError(f"{out} is the current folder or contains it; a run replaces its output folder, so "
                            f"name a new folder", None, "output_dir")
        if self.final.exists() and not self.final.is_dir():
            raise UserError(f"{out} is a file, not a folder", None, "output_dir")
        if self.partial.is_symlink() or (self.partial.exists() and not self.partial.is_dir()):
            raise UserError(f"{self.partial} is a symbolic link or a file, not a run's working folder; remove it",
                            None, "output_dir")
        for key, value in input_paths(self.recipe):
            self._check_input(key, value)
            for ancestor in lineage(value):  # what the input was made from is read too (a base under an adapter)
                self._check_input(f"{key}, made from {ancestor}", ancestor)

    def _check_input(self, key: str, value: str) -> None:
        """Refuse an output folder (or its `.partial`) that is, holds or sits inside the input `value`."""
        path = Path(value).expanduser()
        if not value.strip() or not path.exists():
            return  # a hub id, a template name or a missing file (the stage reports that): nothing to harm
        source = Path(os.path.realpath(path))
        for out in (self.final, self.partial):
            target = Path(os.path.realpath(out))
            if source == target or target in source.parents:
                raise UserError(f"{value} ({key}) is {'' if source == target else 'inside '}the output folder "
                                f"{out}; the run would replace its own input", None, "output_dir")
            if source in target.parents:
                raise UserError(f"{out} is inside {value} ({key}); the run would write into its own input",
                                None, "output_dir")

    def _decide(self) -> str:
        """'finished' (keep the finished run), 'pending' (a finished `.partial` to move into place),
        'resume' (from the newest complete checkpoint) or 'fresh'. Reads only; raises what the policy refuses."""
        r = self.recipe
        self._check_owner()
        manifest = self._finished_manifest()
        if manifest is not None:
            if r.resume and not r.overwrite:
                if manifest.get("recipe_sha256") != self.recipe_hash() or manifest.get("stage") != self.stage:
                    raise UserError("holds a finished run made from a different recipe; use overwrite=true "
                                    "or another output_dir", str(self.final), "output_dir")
                return "finished"
            if not r.overwrite:
                raise UserError("holds a finished run; pass overwrite=true to replace it or resume=true to "
                                "keep it", str(self.final), "output_dir")
        if r.resume is False or not self.partial.is_dir():
            return "fresh"
        if self._pending():
            return "pending"
        return "resume" if self.latest_checkpoint() is not None else "fresh"

    def _finished_manifest(self) -> dict | None:
        """The manifest of the finished run at output_dir; None for a missing or empty folder; an error for
        any other folder (overwrite=true replaces only a finished run of this pipeline)."""
        if not self.final.exists():
            return None
        manifest = read_manifest(self.final)
        if manifest is None:
            if any(self.final.iterdir()):
                raise UserError(f"{self.final} exists and is not a finished run of this pipeline (no "
                                f"{MANIFEST}); overwrite=true replaces only such a run: choose an empty or new "
                                f"output_dir", None, "output_dir")
            return None
        if not is_run_manifest(manifest):
            raise UserError(f"{self.final} holds a {MANIFEST} that no stage of this pipeline wrote; "
                            f"overwrite=true replaces only a finished run: choose an empty or new output_dir",
                            None, "output_dir")
        return manifest

    def _pending(self) -> bool:
        """`.partial` holds this recipe's finished run (its manifest is written last, so it is complete)."""
        try:
            manifest = read_manifest(self.partial)
        except UserError:
            return False
        return (manifest is not None and is_run_manifest(manifest) and manifest["stage"] == self.stage
                and manifest["recipe_sha256"] == self.recipe_hash())

    # --- acting (main process) ---------------------------------------------------------------

    def _settle(self, decision: str) -> None:
        if decision == "finished":
            return
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only parent, a file in the way
            raise UserError(f"cannot create {self.partial}: {err.strerror or err}", None, "output_dir") from None
        self._lock()
        try:
            if self._decide() != decision:
                raise UserError(f"another run changed {self.final} while this one started; run the command again",
                                None, "output_dir")
            if decision in ("resume", "pending"):
                self._refuse_links()
            if decision == "pending":
                print(f"{self.partial} holds this recipe's finished run, killed before it was moved into place; "
                      f"moving it", file=sys.stderr)
                self._move_into_place()
            elif decision == "fresh":
                if self.recipe.resume:
                    print(f"resume=true: no checkpoint in {self.partial}; starting from the beginning",
                          file=sys.stderr)
                self._clear()
        except BaseException:
            self._release()
            raise

    def _lock(self) -> None:
        """Hold `.partial/.lock` with flock: taken atomically by one process; released by the kernel when
        it exits, however it exits (so no stale lock, and no PID that a new process may have reused)."""
        path = self.partial / LOCK
        key = os.path.abspath(path)
        if key in _HELD:
            return  # an earlier RunFolder of this process holds it (a re-run in the same interpreter)
        fd = open_own(path, os.O_RDWR | os.O_CREAT)  # a link, FIFO or hard link there: refused, never written
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f" (pid {holder[1]} on {holder[0]})" if len(holder) >= 2 else ""
            raise UserError(f"another run{who} is writing {self.partial}; wait for it or choose another "
                            f"output_dir", None, "output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        _HELD[key] = fd
        if not (self.partial / OWNER).is_file():
            write_json_atomic(self.partial / OWNER, self._owner())

    def _release(self) -> None:
        _release(self.partial)

    def _refuse_links(self) -> None:
        """A run folder never holds symbolic or hard links; resuming would write through one (metrics, checkpoints)."""
        for root, dirs, files in os.walk(self.partial):
            for name in dirs + files:
                path = os.path.join(root, name)
                info = os.lstat(path)
                kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else \
                    f"a file with {info.st_nlink} hard links" if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 \
                    else None
                if kind:
                    raise UserError(f"{path} is {kind}: a run folder never holds one, and resuming would write "
                                    f"through it; remove it, or pass resume=false to start over", None, "output_dir")

    def _owner(self) -> dict:
        """What `.partial/.owner.json` records: the working folder belongs to a run of this stage and output_dir."""
        return {"stage": self.stage, "output_dir": os.path.abspath(self.final)}

    def _check_owner(self) -> None:
        """Only a working folder that this pipeline created for this stage and output_dir is resumed or cleared: a
        user's folder named like one, or a finished run whose own output_dir was `X.partial`, is left alone."""
        if not self.partial.is_dir():
            return
        entries = {entry.name for entry in self.partial.iterdir()}
        if entries <= {LOCK}:
            return  # nothing to lose (a run killed right after creating it)
        try:
            owner = json.loads((self.partial / OWNER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = None
        if owner == self._owner():
            return
        if owner is None and LOCK in entries and _locked_by_other(self.partial / LOCK):
            return  # a run that has just taken it and not yet written its owner: `_lock` says who holds it
        what = "was not created by a run of this pipeline" if not isinstance(owner, dict) else \
            (f"is the working folder of a {str(owner.get('stage'))[:20]!r} run writing "
             f"{str(owner.get('output_dir'))[:200]}")
        raise UserError(f"{self.partial} {what}, so it is neither resumed nor cleared; move it away or choose another "
                        f"output_dir", None, "output_dir")

    def _clear(self) -> None:
        """Empty `.partial` for a fresh start (the lock and owner stay; links are removed, never followed)."""
        for entry in self.partial.iterdir():
            if entry.name not in (LOCK, OWNER):
                _remove(entry)

    def _move_into_place(self) -> None:
        """`.partial` (with its manifest) -> `output_dir`. A kill at any point leaves either a `.partial`
        that the next start moves into place, or the finished run (plus at most a hidden `.old-*` folder
        that the next finish removes); never a half-deleted checkpoint that looks complete."""
        trash = self.partial / ".trash"
        if self.checkpoints.exists():
            _remove(trash)
            os.replace(self.checkpoints, trash)  # one rename: checkpoints are there entirely or not at all
        _remove(trash)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        if self.final.exists() or self.final.is_symlink():
            _remove(old)
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        (self.final / LOCK).unlink(missing_ok=True)
        (self.final / OWNER).unlink(missing_ok=True)
        self._release()
        for leftover in self.final.parent.glob(f".{glob.escape(self.final.name)}.old-*"):
            _remove(leftover)

    @staticmethod
    def discard_failed(recipe) -> None:
        """After an error: if this process holds `.partial`, remove it unless it holds a complete checkpoint
        to resume from or a finished run to move into place; release it either way."""
        final = Path(recipe.output_dir)
        partial = final.parent / (final.name + ".partial")
        if os.path.abspath(partial / LOCK) not in _HELD:
            return  # not created by this process (another run's, or we failed before taking it): leave it
        keep = newest_complete(partial / "checkpoints")[0] is not None or (partial / MANIFEST).is_file()
        _release(partial)
        if not keep:
            shutil.rmtree(partial, ignore_errors=True)

    def recipe_hash(self) -> str:
        """sha256 of the resolved recipe without `resume`/`overwrite` (what the run's results depend on)."""
        return recipe_hash({k: v for k, v in self.resolved.items() if k not in ("resume", "overwrite")})

    # --- checkpoints -------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; a newer incomplete one is passed over with a one-line warning."""
        newest, skipped = newest_complete(self.checkpoints)
        for path, reason in skipped:
            if self.is_main and path not in self._warned:
                self._warned.add(path)
                warn(f"checkpoint {path} is incomplete ({reason}); using an older one")
        return newest

    def check_resume_recipe(self, saved_sha: str) -> None:
        if saved_sha != self.recipe_hash():
            raise UserError(f"{self.partial} holds a checkpoint of a different recipe; pass resume=false to "
                            f"start over or change output_dir", None, "resume")

    # --- finishing ---------------------------------------------------------------------------

    def input(self, name: str, path_or_id: str | None) -> None:
        """Record an input (data file, parent run, hub id) by hash in the manifest (None is skipped). When
        resuming, an input whose content changed since the checkpoints were written is an error naming it."""
        if not self.is_main or not path_or_id:
            return
        record = hash_input(path_or_id)
        if self.resuming:
            if self._saved_inputs is None:
                # kept in the checkpoint's sealed state (`Scaffold.save_checkpoint`): a file beside the checkpoints
                # could be emptied, and the check with it
                ckpt = self.latest_checkpoint()
                saved = read_state(ckpt).get("inputs") if ckpt is not None else None
                if not isinstance(saved, dict):
                    raise UserError(f"checkpoint {ckpt} records no input hashes (an older version wrote it), so a "
                                    f"changed input could not be noticed: pass resume=false to start over", None,
                                    "resume")
                self._saved_inputs = saved
            before = self._saved_inputs.get(name)
            if before is not None and _identity(before) != _identity(record):
                raise UserError(f"{path_or_id} changed since the checkpoints in {self.partial} were written "
                                f"({_identity(before)[1][:12]} -> {_identity(record)[1][:12]}); resuming would "
                                f"train on two different inputs: restore it, or pass resume=false to start over",
                                None, name)
        self.inputs[name] = record

    @contextlib.contextmanager
    def optional(self, what: str):
        """A part of the artifact that must never cost the trained model (e.g. a sample table): an error in
        it is one warning line and the run finishes without it (RLHF_DEBUG=1 raises it instead)."""
        try:
            yield
        except Exception as err:
            if os.environ.get("RLHF_DEBUG"):
                raise
            if self.is_main:
                warn(f"{what} failed ({describe(err)}); the run finishes without it")

    def finish(self, metrics: dict, extra: dict | None = None, derived: dict | None = None) -> Path:
        """Write recipe.yaml + manifest.json, drop checkpoints and move `.partial` into place."""
        if self.is_main:
            write_text_atomic(self.partial / "recipe.yaml", dump_yaml(self.resolved))
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
                "metrics": {k: finite_or_none(v) for k, v in metrics.items()},
                **(extra or {}),
            }
            if (self.partial / "model").is_dir():
                manifest["model_sha256"] = sha256_tree(self.partial / "model")
            # written last: from here the run is finished, and a kill leaves a `.partial` the next start moves
            write_json_atomic(self.partial / MANIFEST, manifest)
            self._move_into_place()
        self._wait()
        return self.final


def _identity(record: dict) -> tuple[str, str]:
    """What makes an input the same input: its kind and content hash (or hub id); not where it lies."""
    return str(record.get("kind")), str(record.get("sha256") or record.get("hub_id"))


def _locked_by_other(lock: Path) -> bool:
    """Whether another process holds the flock of `lock` (opened read-only: nothing is created or written)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _release(partial: Path) -> None:
    fd = _HELD.pop(os.path.abspath(partial / LOCK), None)
    if fd is not None:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
