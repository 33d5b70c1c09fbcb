"""Optimizer, LR schedule and the guarded optimizer step (gradient clipping, non-finite checks)."""

from __future__ import annotations

import math

import torch
from accelerate.utils import DistributedType
from transformers import get_scheduler

from rlhf.errors import TrainingStopped


def build_optimizer(params, train, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors). Under ZeRO-3 a
    loaded parameter is a flat partition: its dimensions are those of `ds_shape`. Empty groups are left out
    (DeepSpeed drops them, and a schedule built on the optimizer must see the groups it steps)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = bool(params) and params[0].is_cuda  # fused AdamW is faster on CUDA and identical in math
    return torch.optim.AdamW(groups, lr=lr or train.lr, betas=tuple(train.adam_betas), eps=train.adam_eps,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, train, total_steps: int):
    """transformers' warmup + cosine/linear/constant schedule over `total_steps` optimizer steps."""
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.scheduler]
    warmup = int(math.ceil(train.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


class StepGuard:
    """Counts non-finite steps and decides skip or stop (recipe `train.on_nonfinite`, `train.max_nonfinite`);
    a run whose every step was skipped trained nothing and stops (`check_trained`)."""

    def __init__(self, train):
        self.policy = train.on_nonfinite
        self.limit = train.max_nonfinite
        self.skipped = 0
        self.applied = 0  # optimizer steps taken

    def check(self, step: int, quantity: str, value: float) -> bool:
        """True if `value` is finite; otherwise count it, or stop the run with a message naming the step."""
        if math.isfinite(value):
            return True
        self.skipped += 1
        if self.policy == "stop" or self.skipped > self.limit:
            why = "train.on_nonfinite=stop" if self.policy == "stop" else f"more than {self.limit} skipped steps"
            raise TrainingStopped(f"non-finite {quantity} ({value}) at step {step}; stopping ({why})")
        return False

    def check_trained(self) -> None:
        """At the end of training: stop the run (nothing is saved) if every step was skipped as non-finite."""
        if self.skipped and not self.applied:
            raise TrainingStopped(f"every one of the {self.skipped} steps was skipped as non-finite: nothing was "
                                  f"trained; check the data (e.g. margins), train.lr and train.mixed_precision")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        self.applied = int(state.get("applied", 1))  # a checkpoint that did not count them: assume progress


def optimizer_step(accelerator, parts: dict[str, tuple], max_grad_norm: float | None, guard: StepGuard,
                   step: int, loss_value: float) -> dict:
    """Clip, check and step every `name: (model, optimizer, scheduler)` of `parts` together.

    One decision per step: a non-finite loss or gradient norm skips the update of all of them (PPO's
    actor and critic) and is counted once. Returns `{"<name>/grad_norm", "<name>/lr", "train/skipped"}`.
    """
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.scaler is not None and len(parts) > 1:
        raise ValueError("fp16 loss scaling with several optimizers is not supported (one shared grad scaler)")
    # all parameters, not only trainable ones: under FSDP accelerate clips through the wrapped module only
    # when it is given exactly that module's parameter list; frozen parameters have no gradient anyway.
    # max_grad_norm None = measure only (an infinite bound scales nothing).
    norms = {name: accelerator.clip_grad_norm_(list(model.parameters()), max_grad_norm or math.inf)
             for name, (model, _, _) in parts.items()}
    norms = {name: float("nan") if n is None else float(n) for name, n in norms.items()}
    ok = guard.check(step, "loss", loss_value)
    if accelerator.scaler is None and not deepspeed:
        # (fp16: the grad scaler skips steps with inf gradients itself and lowers its scale)
        for name, norm in norms.items():
            ok = ok and guard.check(step, "gradient norm" if len(parts) == 1 else f"{name} gradient norm", norm)
    out = {"train/skipped": float(not ok)}
    guard.applied += ok or accelerator.scaler is not None or deepspeed  # (those skip inf steps themselves)
    for name, (_, optimizer, scheduler) in parts.items():
        # DeepSpeed's engine already clipped (its config's gradient_clipping) and stepped inside
        # `accelerator.backward` on the last micro-batch; accelerate makes these calls no-ops then.
        if ok or accelerator.scaler is not None or deepspeed:
            optimizer.step()
        scheduler.step()  # the schedule advances either way so a skipped step does not shift later ones
        optimizer.zero_grad(set_to_none=True)
        out[f"{name}/grad_norm"] = norms[name]
        out[f"{name}/lr"] = scheduler.get_last_lr()[0]
    return out
