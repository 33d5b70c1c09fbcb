"""metrics.jsonl: one JSON object per logged step, with flat `group/name` keys, written by the main process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rlhf.files import open_own


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
            fd = open_own(self.path, os.O_RDWR)
            try:
                os.ftruncate(fd, resume_offset)
            finally:
                os.close(fd)
        elif resume_offset is None and (self.path.exists() or self.path.is_symlink()):
            self.path.unlink()

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: finite_or_none(v) for k, v in metrics.items()}
        self.last.update({k: v for k, v in clean.items() if v is not None})
        if not self.enabled:
            return
        fd = open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")


def finite_or_none(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
