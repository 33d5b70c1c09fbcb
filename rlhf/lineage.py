"""Manifests and the ancestry of a run's inputs: how an input is identified (`hash_input`), every folder it was
made from (`lineage`), and which run folders may feed which stage (`check_parents`)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.errors import UserError, describe
from rlhf.files import sha256_file, sha256_tree
from rlhf.recipes import PARENT_STAGES, RECIPES

MANIFEST = "manifest.json"


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


def lineage(path_or_id: str, limit: int = 256) -> list[str]:
    """Every folder or file an input was made from, through its whole ancestry: the inputs recorded in the manifest
    of each run folder, and the base model named by each adapter. A run must write over none of them (replacing the
    base model under an adapter breaks the run that trained it). Unreadable records are skipped (not this check's
    business); at most `limit` ancestors."""
    seen: set[str] = set()
    todo = [path_or_id]
    while todo and len(seen) < limit:
        path = Path(todo.pop()).expanduser()
        found = []
        for folder in (path, path / "model"):
            try:
                cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
                found.append(cfg.get("base_model_name_or_path"))
            except (OSError, ValueError, AttributeError):
                pass
        try:
            manifest = read_manifest(path) if path.is_dir() else None
        except UserError:
            manifest = None
        inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
        if isinstance(inputs, dict):
            found += [record.get("path") for record in inputs.values() if isinstance(record, dict)]
        for ancestor in found:
            if isinstance(ancestor, str) and ancestor.strip() and ancestor not in seen and Path(ancestor).exists():
                seen.add(ancestor)
                todo.append(ancestor)
    return sorted(seen)


def read_manifest(run_dir: str | Path) -> dict | None:
    """The manifest of a run folder (None when there is none); a broken one is a one-line error."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"broken manifest ({err.msg})", f"{path}:{err.lineno}") from None
    except (ValueError, RecursionError, OSError) as err:  # not UTF-8, absurd numbers or nesting, unreadable
        raise UserError(f"broken manifest ({describe(err)})", str(path)) from None
    if not isinstance(manifest, dict):
        raise UserError(f"broken manifest (a JSON {type(manifest).__name__}, not an object)", str(path))
    return manifest


def is_run_manifest(manifest: dict) -> bool:
    """Whether a manifest was written by a stage of this pipeline (and not by some other tool)."""
    return manifest.get("stage") in RECIPES and isinstance(manifest.get("recipe_sha256"), str)


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
