"""Process-level setup shared by the stages: accelerator, seeding, cross-process sums, Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed

from rlhf import tracking

from rlhf.errors import Interrupted


def resolve_mixed_precision(choice: str) -> str:
    """`auto` = bf16 on a CUDA device that supports it, otherwise full precision."""
    if choice != "auto":
        if choice != "no" and not torch.cuda.is_available():
            return "no"  # autocast to bf16/fp16 on CPU is slow and not what a GPU recipe meant
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mixed_precision: str = "auto", report_to: list[str] | None = None,
                     output_dir: str | None = None) -> Accelerator:
    """The accelerator of a training stage. `report_to` (`train.report_to`): accelerate trackers, checked first (a
    missing package is a recipe error, before any model is loaded) and started by the scaffold
    (`rlhf.tracking`); TensorBoard writes into the run folder being built for `output_dir`."""
    # We run gradient accumulation ourselves (token-weighted over the whole accumulated batch, see
    # `micro_batch`), so accelerate's own accumulation stays at 1 step and never rescales the loss.
    # Without CUDA, a multi-process launch (`accelerate launch --multi_gpu --num_processes N` or
    # torchrun) runs CPU processes over gloo.
    tracking.check_installed(report_to or [])
    project = ProjectConfiguration(logging_dir=str(tracking.logging_dir(output_dir))) if output_dir else None
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=not torch.cuda.is_available(),
                       log_with=list(report_to or []) or None, project_config=project)


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, models, last: bool):
    """Forward and backward of one micro-batch of an accumulated step; gradients are reduced over
    processes only on the `last` one.

    DDP skips the all-reduce inside `no_sync`. DeepSpeed's engine steps inside `accelerator.backward`
    whenever accelerate's `sync_gradients` flag is set (its gradient-accumulation boundary), so the flag
    must be False for every micro-batch but the last, or ZeRO would take one optimizer step per
    micro-batch. accelerate sets this flag by itself only inside its own `accumulate()`, whose step counting
    and loss division we do not use (our losses are already divided by the global token count), so we set
    it here through its public setter. Call `accelerator.backward` inside the block.
    """
    accelerator.sync_gradients = last
    with contextlib.ExitStack() as stack:
        if not last:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def partial_state() -> PartialState:
    """Process information for stages that train nothing (tasks, eval, export)."""
    return PartialState(cpu=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); CPU runs with a fixed seed repeat bit for bit."""
    set_seed(seed)


def global_sum(accelerator: Accelerator, value: torch.Tensor | float) -> torch.Tensor:
    """Sum a number over all processes (float64 on the accelerator's device)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).clone()
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t


def global_sums(accelerator: Accelerator, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Sum several numbers over all processes in one collective; returns python floats."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=accelerator.device).reshape(())
                     for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


class Interrupt:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM (what schedulers, `docker stop` and Kubernetes send) into
    a flag the loop checks after each step: it saves a checkpoint and raises `Interrupted`, which leaves
    this block carrying the signal (the CLI exits with 128 + its number). A second signal of either kind
    ends the process at once, without a checkpoint.

    Under a multi-process launch every process gets the signal; the loops sum `requested` over processes,
    so all of them checkpoint at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.requested:
                print(f"\n{name} again: stopping at once, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.requested, self.signum = True, signum
            print(f"\n{name}: saving a checkpoint after this step (send it again to stop at once)", file=sys.stderr)

        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                break
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if isinstance(exc, Interrupted) and exc.signum is None:
            exc.signum = self.signum
        return False
