"""Optimiser, LR schedule and the guarded optimizer step (gradient clipping, non-finite checks)."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from rlhf.errors import TrainingStopped


def build_optimizer(params, train, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = bool(params) and params[0].is_cuda  # fused AdamW is faster on CUDA and identical in math
    return torch.optim.AdamW(groups, lr=lr or train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, train, total_steps: int):
    """transformers' warmup + cosine/linear/constant schedule over `total_steps` optimizer steps."""
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.scheduler]
    warmup = int(math.ceil(train.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


class StepGuard:
    """Counts non-finite steps and decides skip or stop (recipe `train.on_nonfinite`, `train.max_nonfinite`)."""

    def __init__(self, train):
        self.policy = train.on_nonfinite
        self.limit = train.max_nonfinite
        self.skipped = 0

    def check(self, step: int, quantity: str, value: float) -> bool:
        """True if `value` is finite; otherwise count it, or stop the run with a message naming the step."""
        if math.isfinite(value):
            return True
        self.skipped += 1
        if self.policy == "stop" or self.skipped > self.limit:
            why = "train.on_nonfinite=stop" if self.policy == "stop" else f"more than {self.limit} skipped steps"
            raise TrainingStopped(f"non-finite {quantity} ({value}) at step {step}; stopping ({why})")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float | None, guard: StepGuard,
                   step: int, loss_value: float) -> dict:
    """Clip, check, step. A non-finite loss or gradient norm skips the update (gradients dropped).

    Returns `{"train/grad_norm": ..., "train/lr": ..., "train/skipped": 0 or 1}`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
    grad_norm = float(grad_norm)
    if accelerator.scaler is not None:
        # fp16: the grad scaler skips steps with inf gradients itself and lowers its scale; only a
        # non-finite loss is ours to count
        ok = guard.check(step, "loss", loss_value)
        optimizer.step()
    else:
        ok = guard.check(step, "loss", loss_value) and guard.check(step, "gradient norm", grad_norm)
        if ok:
            optimizer.step()
    scheduler.step()  # the schedule advances either way so a skipped step does not shift later ones
    optimizer.zero_grad(set_to_none=True)
    return {"train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0], "train/skipped": float(not ok)}
