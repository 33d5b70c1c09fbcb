"""Pushing an exported folder to the Hugging Face hub.

The token comes from the environment (HF_TOKEN) or `huggingface-cli login`, through huggingface_hub
itself; this module never reads, prints or stores it. Failures are one-line UserErrors.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import UserError


def push_folder(folder: Path, repo_id: str, private: bool = True, revision: str | None = None,
                commit_message: str = "Upload model") -> dict:
    """Create the repo (if needed) and upload `folder`; returns {'repo_id', 'revision', 'commit'}."""
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`; the local export is "
                        f"complete in {folder}", None, "export.push_to_hub")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message)
    except Exception as err:  # network, permission, repo-name errors all end the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"push to {repo_id} failed: {first}; the local export is complete in {folder}", None,
                        "export.hub_repo_id") from None
    return {"repo_id": repo_id, "revision": revision or "main", "commit": getattr(info, "oid", None),
            "url": getattr(info, "commit_url", None)}
