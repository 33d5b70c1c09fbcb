"""Pushing an exported folder to the Hugging Face hub.

The token comes from the environment (HF_TOKEN) or `huggingface-cli login`, through huggingface_hub
itself; this module never reads, prints or stores it. Failures are one-line UserErrors, and a push that
failed is retried by running the export again with `resume=true` (`push_run`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf.artifacts import MANIFEST, read_manifest
from rlhf.files import write_json_atomic
from rlhf.errors import UserError


def push_run(run: Path, export) -> None:
    """Push the `model/` of a finished export run folder to `export.hub_repo_id` and record the commit in
    its manifest (`pushed`); a folder already pushed to that repo and revision is left as it is."""
    manifest = read_manifest(run) or {}
    target = {"repo_id": export.hub_repo_id, "revision": export.revision or "main"}
    done = manifest.get("pushed")
    if isinstance(done, dict) and all(done.get(k) == v for k, v in target.items()):
        print(f"{run} was pushed to {target['repo_id']} ({target['revision']}) already", file=sys.stderr)
        return
    manifest["pushed"] = push_folder(run / "model", export.hub_repo_id, private=export.private,
                                     revision=export.revision, commit_message=export.commit_message)
    write_json_atomic(run / MANIFEST, manifest)


def push_folder(folder: Path, repo_id: str, private: bool = True, revision: str | None = None,
                commit_message: str = "Upload model") -> dict:
    """Create the repo (if needed) and upload `folder`; returns {'repo_id', 'revision', 'commit'}."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`; the local export is "
                        f"complete in {folder} (push it with the same command and resume=true)", None,
                        "export.push_to_hub")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message)
    except Exception as err:  # network, permission, repo-name errors all end the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"push to {repo_id} failed: {first}; the local export is complete in {folder} (push it "
                        f"with the same command and resume=true)", None, "export.hub_repo_id") from None
    return {"repo_id": repo_id, "revision": revision or "main", "commit": getattr(info, "oid", None),
            "url": getattr(info, "commit_url", None)}
