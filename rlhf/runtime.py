"""Process-level setup shared by the stages: accelerator, seeding, cross-process sums, Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed

from rlhf import tracking


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
    """Turns the first Ctrl-C into a flag the loop checks after each step (a second one aborts)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
