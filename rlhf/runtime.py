"""Process-level setup shared by the stages: accelerator, seeding, cross-process sums, Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from rlhf import tracking

from rlhf.errors import Interrupted, RecipeError


def resolve_mixed_precision(choice: str) -> str:
    """`auto` = bf16 on a CUDA device that supports it, otherwise full precision."""
    if choice != "auto":
        if choice != "no" and not torch.cuda.is_available():
            return "no"  # autocast to bf16/fp16 on CPU is slow and not what a GPU recipe meant
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(recipe) -> Accelerator:
    """The accelerator of a training stage, built from its recipe before any model loads. `train.report_to`:
    accelerate trackers, checked first (a missing package is a recipe error) and started by the scaffold
    (`rlhf.tracking`); TensorBoard writes into the run folder being built for `output_dir`. Under DeepSpeed the
    engine's batch sizes and clipping come from the recipe (`fit_deepspeed`); combinations that cannot run are
    one-line recipe errors (`check_engine`)."""
    train = recipe.train
    mixed_precision, report_to, output_dir = train.mixed_precision, train.report_to, recipe.output_dir
    # We run gradient accumulation ourselves (token-weighted over the whole accumulated batch, see
    # `micro_batch`), so accelerate's own accumulation stays at 1 step and never rescales the loss.
    # Without CUDA, a multi-process launch (`accelerate launch --multi_gpu --num_processes N` or
    # torchrun) runs CPU processes over gloo.
    tracking.check_installed(report_to or [])
    project = ProjectConfiguration(logging_dir=str(tracking.logging_dir(output_dir))) if output_dir else None
    cpu = not torch.cuda.is_available()
    if cpu and cpu_sharding():
        _cpu_sharded_state()
        cpu = False  # `cpu=True` would make accelerate ignore the FSDP/DeepSpeed config
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=cpu,
                              log_with=list(report_to or []) or None, project_config=project)
    check_engine(accelerator, recipe)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fit_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, train, accelerator.num_processes)
    return accelerator


def check_engine(accelerator, recipe) -> None:
    """Combinations of an accelerate config and a recipe that cannot run: one line naming the key."""
    lora = getattr(recipe, "lora", None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            int(accelerator.state.deepspeed_plugin.zero_stage) == 3 and getattr(lora, "quantization", "none") != "none":
        raise RecipeError("ZeRO-3 partitions every weight, and a 4-bit (bitsandbytes) base cannot be partitioned: "
                          "use ZeRO-2, FSDP or DDP for QLoRA, or lora.quantization: none", key="lora.quantization")


def fit_deepspeed(config: dict, train, processes: int) -> None:
    """Set the DeepSpeed config's batch figures from the recipe. DeepSpeed needs `train_micro_batch_size_per_gpu`
    (accelerate otherwise wants a dataloader to read it from); our loop accumulates itself (`micro_batch`, losses
    already divided by the global count), so the engine's own `gradient_accumulation_steps` must stay 1, or
    DeepSpeed would divide every loss by it again. Clipping is the recipe's `train.max_grad_norm` (0 = off).
    A config that states other batch sizes contradicts the recipe: a recipe error naming the key."""
    micro = train.micro_batch_size
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "train_batch_size": micro * processes}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and int(given) != value:
            hint = {"train_micro_batch_size_per_gpu": f"train.micro_batch_size is {micro}",
                    "gradient_accumulation_steps": "the recipe accumulates itself (train.batch_size / "
                                                   "(train.micro_batch_size x processes)); set it to 1 or auto",
                    "train_batch_size": f"train.micro_batch_size {micro} x {processes} processes = {value} "
                                        "(a DeepSpeed step is one micro-batch here)"}[key]
            raise RecipeError(f"the DeepSpeed config's {key} is {given}, but {hint}", key=f"deepspeed_config.{key}")
    config.update(wanted)
    config["gradient_clipping"] = float(train.max_grad_norm or 0.0)


SHARDING_SWITCH = "RLHF_CPU_SHARDING"


def cpu_sharding() -> bool:
    """`RLHF_CPU_SHARDING=1`, a testing aid: on a machine without CUDA, an FSDP or DeepSpeed accelerate config
    runs as CPU processes over gloo (as on GPUs, but slowly), instead of accelerate's silent fallback to plain
    multi-process CPU data parallelism. Without it (or with CUDA) nothing changes."""
    return os.environ.get(SHARDING_SWITCH, "0") == "1" and not torch.cuda.is_available()


def _cpu_sharded_state() -> None:
    """The one place that knows how accelerate (1.10-1.16) is talked into FSDP/DeepSpeed on CPU processes:
    start the process state as a CPU one (gloo, CPU device), then build the `Accelerator` without `cpu=True`.
    FSDP: accelerate turns its plugin on only from a GPU-type state, so the state says MULTI_GPU (its device
    stays the CPU) and `ACCELERATE_USE_CPU` keeps the accelerator on it. DeepSpeed: its CPU accelerator
    (`DS_ACCELERATOR=cpu`, read when deepspeed is first imported), and not `ACCELERATE_USE_CPU`, which would
    turn DeepSpeed off."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["ACCELERATE_USE_CPU"] = "false"
        PartialState(cpu=True)
        import deepspeed.ops

        # DeepSpeed would compile its shared-memory all-reduce kernel (a CPU-only speed-up, about 3 minutes of
        # g++ on first use); gloo carries the same collectives without it, and a GPU run uses NCCL anyway.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        os.environ["ACCELERATE_USE_CPU"] = "true"
        state = PartialState(cpu=True)
        if state.num_processes > 1:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def engine_figures(accelerator) -> dict:
    """What ran, for the manifest's `derived` and the start line: accelerate's `distributed_type` (NO,
    MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED), plus `zero_stage` (DeepSpeed) or `fsdp_version` (FSDP)."""
    kind = accelerator.distributed_type
    out = {"distributed_type": kind.value if hasattr(kind, "value") else str(kind)}
    if kind == DistributedType.DEEPSPEED:
        out["zero_stage"] = int(accelerator.state.deepspeed_plugin.zero_stage)
    elif kind == DistributedType.FSDP:
        out["fsdp_version"] = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))
    return out


def engine_line(accelerator) -> str:
    """The start line's account of what runs: `FSDP (fsdp_version 2), 2 processes`."""
    figures = engine_figures(accelerator)
    extra = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "distributed_type")
    return f"{figures['distributed_type']}{f' ({extra})' if extra else ''}, {accelerator.num_processes} " \
           f"process{'es' if accelerator.num_processes > 1 else ''}"


def collective_forwards(accelerator) -> bool:
    """Whether every forward is a collective (FSDP gathers each layer's shards, ZeRO-3 its partitions): then
    all processes must run the same number of forwards, and none may run one alone."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and \
        int(accelerator.state.deepspeed_plugin.zero_stage) == 3


def forwards_to_match(accelerator, n: int, micro: int, mine: int) -> int:
    """Forwards this process must add (and discard) so that it runs as many as the process with the longest share
    of `n` items dealt round-robin in micro-batches of `micro` (`rlhf.batching.eval_shard`): 0 unless forwards
    are collective."""
    if not collective_forwards(accelerator):
        return 0
    most = -(-n // accelerator.num_processes)
    return -(-most // micro) - mine


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
