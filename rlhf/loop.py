"""The supervised training loop shared by pretrain, sft, rm and dpo.

Per optimizer step (the textbook order):
  1. plan which examples each process sees (`data.plan_batches`);
  2. sum the step's weights (trained tokens, pairs, ...) over all micro-batches of all processes: these
     global denominators make every loss an exact mean over the whole accumulated, multi-process batch
     (not a mean of per-micro-batch means);
  3. forward/backward each micro-batch (gradient sync only on the last one);
  4. clip, check for non-finite values, step (`optim.optimizer_step`);
  5. log, evaluate, checkpoint on their cadences.

The stage supplies `weights(indices) -> {name: float}` and `micro_loss(indices, denominators) ->
(loss, stats)`, where loss and stats are already divided by the global denominators, so that summing
them over micro-batches and processes gives the step's means.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from rlhf import checkpoint
from rlhf.artifacts import MetricsLog
from rlhf.data import eval_shard, plan_batches, steps_per_epoch
from rlhf.errors import Interrupted, UserError
from rlhf.optim import StepGuard, optimizer_step
from rlhf.runtime import Interrupt, global_sum, global_sums, micro_batch

Stats = dict[str, torch.Tensor]


@dataclass
class Task:
    """What a stage plugs into the loop."""

    n_train: int
    weights: Callable[[list[int]], dict[str, float]]
    micro_loss: Callable[[list[int], dict[str, float]], tuple[torch.Tensor, Stats]]
    lengths: list[int] | None = None  # per training example, to batch similar lengths together
    n_eval: int = 0
    eval_weights: Callable[[list[int]], dict[str, float]] | None = None
    eval_loss: Callable[[list[int], dict[str, float]], tuple[torch.Tensor, Stats]] | None = None
    finalize: Callable[[dict[str, float]], dict[str, float]] | None = None  # derived stats (ppl, std)
    best_key: str | None = None  # eval metric to keep the best model by (lower is better)
    on_best: Callable[[], None] | None = None  # save the best model (called on the main process too)
    progress: tuple[str, ...] = ("loss",)


def total_steps(n: int, train) -> int:
    per_epoch = steps_per_epoch(n, train.batch_size)
    if per_epoch == 0:
        raise UserError(f"only {n} training examples, fewer than train.batch_size={train.batch_size}", None,
                        "train.batch_size")
    steps = max(1, int(math.ceil(train.epochs * per_epoch)))
    return min(steps, train.max_steps) if train.max_steps else steps


def _sum_into(acc: dict, stats: Stats) -> None:
    for k, v in stats.items():
        v = v.detach().float()
        acc[k] = acc[k] + v if k in acc else v


def evaluate(accelerator, model, task: Task, micro: int) -> dict[str, float]:
    """Token/pair-weighted means over the whole eval set (sharded over processes)."""
    if not task.n_eval:
        return {}
    if task.n_eval < accelerator.num_processes:
        raise UserError(f"the eval split has {task.n_eval} records, fewer than the {accelerator.num_processes} "
                        f"processes", None, "data.eval")
    shard = eval_shard(task.n_eval, accelerator.process_index, accelerator.num_processes, micro)
    local: dict[str, float] = {}
    for idx in shard:
        for k, v in task.eval_weights(idx).items():
            local[k] = local.get(k, 0.0) + v
    den = global_sums(accelerator, local or {"none": 0.0})
    was_training = model.training
    model.eval()
    sums: Stats = {}
    with torch.no_grad(), accelerator.autocast():
        for idx in shard:
            _, stats = task.eval_loss(idx, den)
            _sum_into(sums, stats)
    model.train(was_training)
    out = global_sums(accelerator, sums)
    if task.finalize:
        out = task.finalize(out)
    return {f"eval/{k}": v for k, v in out.items()}


def run(accelerator, folder, train, seed: int, model, optimizer, scheduler, task: Task, stage: str) -> dict:
    """Train `model` for the recipe's steps; returns the final metrics (last train + last eval)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(task.n_train, train)
    per_epoch = steps_per_epoch(task.n_train, train.batch_size)
    guard = StepGuard(train)
    state = {"step": 0, "best": None, "metrics_offset": None}
    modules, optimizers, schedulers = {"model": model}, {"model": optimizer}, {"model": scheduler}

    if folder.resuming:
        ckpt = folder.latest_checkpoint()
        folder.check_resume_recipe(checkpoint.read_state(ckpt)["recipe_sha256"])
        saved = checkpoint.load(ckpt, accelerator, modules, optimizers, schedulers)
        guard.load_state_dict(saved["guard"])
        state.update(saved)
        if accelerator.is_main_process:
            print(f"resuming from {ckpt} (step {state['step']} of {steps})", file=sys.stderr)
    log = MetricsLog(folder.partial, accelerator.is_main_process, state["metrics_offset"], state["step"])
    final: dict[str, float] = dict(state.get("final") or {})

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        state.update(metrics_offset=log.offset(), guard=guard.state_dict(), recipe_sha256=folder._hash(),
                     final=final, window={k: float(v) for k, v in window.items()}, window_steps=window_steps)
        checkpoint.save(folder.checkpoints, state["step"], accelerator, state, modules, optimizers, schedulers,
                        train.keep_checkpoints)

    bar = tqdm(total=steps, initial=state["step"], desc=stage, disable=not accelerator.is_main_process,
               dynamic_ncols=True, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    model.train()
    # train stats summed since the last log line (restored on resume, so logs match an uninterrupted run)
    window: Stats = {k: torch.tensor(v, device=accelerator.device) for k, v in state.get("window", {}).items()}
    window_steps = state.get("window_steps", 0)
    with Interrupt() as interrupt, bar:
        while state["step"] < steps:
            step = state["step"]
            epoch, in_epoch = divmod(step, per_epoch)
            started = time.perf_counter()
            micros = plan_batches(task.n_train, train.batch_size, train.micro_batch_size, rank, world, seed, epoch,
                                  in_epoch, task.lengths)
            local: dict[str, float] = {}
            for idx in micros:
                for k, v in task.weights(idx).items():
                    local[k] = local.get(k, 0.0) + v
            den = global_sums(accelerator, local)
            loss_total = torch.zeros((), device=accelerator.device)
            for i, idx in enumerate(micros):
                with micro_batch(accelerator, [model], last=i == len(micros) - 1):
                    with accelerator.autocast():
                        loss, stats = task.micro_loss(idx, den)
                    # DDP averages gradients over processes; our loss is this process's share of the global mean
                    accelerator.backward(loss * world)
                loss_total += loss.detach().float()
                _sum_into(window, stats)
            loss_value = float(global_sum(accelerator, loss_total))
            step_stats = optimizer_step(accelerator, {"train": (model, optimizer, scheduler)}, train.max_grad_norm,
                                        guard, step + 1, loss_value)
            step += 1
            state["step"] = step
            elapsed = time.perf_counter() - started

            window_steps += 1
            if step % train.log_every == 0 or step == steps:
                # train/* figures are means over the steps since the last log line
                reduced = {k: v / window_steps for k, v in global_sums(accelerator, window).items()}
                window, window_steps = {}, 0
                if task.finalize:
                    reduced = task.finalize(reduced)
                metrics = {f"train/{k}": v for k, v in reduced.items()}
                metrics.update(step_stats)
                metrics["train/epoch"] = step / per_epoch
                metrics["perf/step_time_s"] = elapsed
                if "tokens" in den:
                    metrics["perf/trained_tokens_per_s"] = den["tokens"] / max(elapsed, 1e-9)
                metrics["train/nonfinite_skipped"] = guard.skipped
                log.log(step, metrics)
                final.update(metrics)
                postfix = {k: f"{reduced[k]:.4g}" for k in task.progress if k in reduced}
                if "tokens" in den:
                    postfix["tok/s"] = f"{metrics['perf/trained_tokens_per_s']:.0f}"
                bar.set_postfix(postfix, refresh=False)
            if task.n_eval and ((train.eval_every and step % train.eval_every == 0) or step == steps):
                ev = evaluate(accelerator, model, task, train.micro_batch_size)
                log.log(step, ev)
                final.update(ev)
                key = task.best_key
                if key and key in ev and (state["best"] is None or ev[key] < state["best"]):
                    state["best"] = ev[key]
                    if task.on_best is not None:
                        task.on_best()
            bar.update(1)

            stop = float(global_sum(accelerator, float(interrupt.requested))) > 0 if world > 1 \
                else interrupt.requested
            if (train.save_every and step % train.save_every == 0 and step < steps) or stop:
                save_checkpoint()
            if stop:
                log.close()
                raise Interrupted(f"interrupted at step {step} of {steps}; checkpoint saved in {folder.checkpoints}")
    log.close()
    guard.check_trained()
    final["train/steps"] = steps
    return final
