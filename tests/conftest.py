"""Shared fixtures: tiny models and data built locally from a config (no hub access)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tokenized data is cached in the session's own folder, never in the user's cache
os.environ.setdefault("RLHF_DATA_CACHE", tempfile.mkdtemp(prefix="rlhf-test-data-"))


def rlhf(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run the CLI in a subprocess (as a user would); returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """A shortened tiny chain (tasks -> pretrain -> sft -> rm) run once per test session.

    Returns a dict of run folders; later stages (ppo, dpo, eval, export) are built by the tests that
    need them from these."""
    from tests.chain import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"))
