"""Resumable checkpoints: trainable weights, optimizers, schedulers, RNG states and loop state.

A checkpoint is written to `checkpoints/.tmp-step-N/`, sealed with `complete.json` (every file and its
size, written last) and renamed to `checkpoints/step-N/`, so a kill during a save leaves the previous
checkpoint intact, and a checkpoint truncated or half-deleted later is recognized as incomplete
(`newest_complete` passes over it). Weights are safetensors; optimizer and scheduler states
are loaded with `torch.load(weights_only=True)`; RNG states are JSON and safetensors (no pickle anywhere).

Under FSDP or DeepSpeed the sharded model and optimizer states are saved by `accelerator.save_state`,
the rest as here. Every process writes its own RNG state into the checkpoint folder, so a multi-node
run needs `output_dir` on a filesystem that all nodes share (as `accelerate save_state` does too).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from rlhf.errors import UserError, describe
from rlhf.files import sha256_file, write_json_atomic

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
COMPLETE = "complete.json"  # written last into a checkpoint: every file with its size


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (LoRA weights, value head, or everything in full FT)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    npy = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(folder: Path, step: int, accelerator, state: dict, modules: dict, optimizers: dict,
         schedulers: dict, keep: int) -> Path:
    """Write checkpoint `step` under `folder` (all processes call this). A full disk is one line saying so and
    where, and the unfinished checkpoint is removed (the previous ones stay intact)."""
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write(tmp, accelerator, state, modules, optimizers, schedulers)
        if accelerator.is_main_process:
            mark_complete(tmp)  # after every process has written its files
    except (OSError, RuntimeError) as err:
        if not disk_full(err):
            raise
        free = shutil.disk_usage(folder).free
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"the disk is full: writing checkpoint {step} failed with {free // 2**20} MiB free on the disk "
                        f"that holds {folder} ({describe(err)}); the unfinished checkpoint was removed and the "
                        f"previous ones are intact: free space, then run the same command to resume", None,
                        "output_dir") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in folder.iterdir() if p.name.startswith("step-"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def disk_full(err: BaseException) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT, or torch's zip writer, which reports a short write
    as `unexpected pos` / `file write failed` without the errno."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "unexpected pos" in text or "file write failed" in text or "No space left" in text


def _write(tmp: Path, accelerator, state: dict, modules: dict, optimizers: dict, schedulers: dict) -> None:
    plain, tensors = _rng_state()
    rank = accelerator.process_index
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(plain))
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))

    if accelerator.distributed_type in SHARDED:
        accelerator.save_state(str(tmp / "accelerate"))
    elif accelerator.is_main_process:
        for name, model in modules.items():
            save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / f"{name}.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.optimizer.pt")
        if accelerator.scaler is not None:  # fp16 loss scale and its growth tracker
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    if accelerator.is_main_process:
        for name, sched in schedulers.items():
            torch.save(sched.state_dict(), tmp / f"{name}.scheduler.pt")
        write_json_atomic(tmp / "state.json", state)
    accelerator.wait_for_everyone()


def read_state(path: Path) -> dict:
    """The loop state of a checkpoint (without loading anything else)."""
    return json.loads((path / "state.json").read_text())


def load(path: Path, accelerator, modules: dict, optimizers: dict, schedulers: dict) -> dict:
    """Restore everything `save` wrote; returns the loop state dict."""
    if accelerator.distributed_type in SHARDED:
        accelerator.load_state(str(path / "accelerate"))
    else:
        for name, model in modules.items():
            weights = load_file(str(path / f"{name}.safetensors"))
            target = accelerator.unwrap_model(model)
            missing = [n for n, p in target.named_parameters() if p.requires_grad and n not in weights]
            if missing:
                raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors of {name} "
                                   f"(e.g. {missing[0]})")
            target.load_state_dict(weights, strict=False)
        for name, opt in optimizers.items():
            opt.load_state_dict(torch.load(path / f"{name}.optimizer.pt", map_location="cpu", weights_only=True))
        if accelerator.scaler is not None and (path / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    for name, sched in schedulers.items():
        sched.load_state_dict(torch.load(path / f"{name}.scheduler.pt", weights_only=True))
    rank = accelerator.process_index
    rng_json = path / f"rng-rank{rank}.json"
    if rng_json.is_file():
        _set_rng_state(json.loads(rng_json.read_text()), load_file(str(path / f"rng-rank{rank}.safetensors")))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------------------------
# sealed checkpoints: complete or not


def mark_complete(folder: Path) -> None:
    """Mark a checkpoint folder complete: `complete.json`, written last, lists every file with its size and sha256
    (a file damaged without changing its size is caught too)."""
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
             for p in sorted(folder.rglob("*")) if p.is_file()}
    write_json_atomic(folder / COMPLETE, {"files": files})


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder is not as `mark_complete` recorded it (truncated, half-deleted, never
    finished, changed); None when it is complete."""
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
        listed = [(str(name), int(size), str(digest)) for name, (size, digest) in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {COMPLETE}"
    for name, size, _ in listed:
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} of its {size} bytes"
    for name, _, digest in listed:  # sizes first: they cost nothing
        if sha256_file(folder / name) != digest:
            return f"{name} has changed since it was written (its sha256 differs)"
    return None


def newest_complete(checkpoints: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete `step-*` checkpoint, and the newer incomplete ones passed over (with why)."""
    if not checkpoints.is_dir():
        return None, []
    skipped = []
    for path in sorted((p for p in checkpoints.iterdir() if p.name.startswith("step-")), reverse=True):
        reason = incomplete_reason(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped
