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
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.batching import eval_shard, plan_batches, steps_per_epoch
from rlhf.errors import UserError
from rlhf.optim import StepGuard, optimizer_step
from rlhf.runtime import forwards_to_match, global_sum, global_sums, micro_batch
from rlhf.scaffold import Scaffold

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
        for _ in range(forwards_to_match(accelerator, task.n_eval, micro, len(shard))):
            task.eval_loss(shard[0], den)  # a process with a shorter shard joins the others' collective forwards
    model.train(was_training)
    out = global_sums(accelerator, sums)
    if task.finalize:
        out = task.finalize(out)
    return {f"eval/{k}": v for k, v in out.items()}


class Window:
    """Train stats summed since the last log line (kept in checkpoints, so a resumed run logs the same means)."""

    def __init__(self, device):
        self.device = device
        self.sums: Stats = {}
        self.steps = 0

    def add(self, stats: Stats) -> None:
        _sum_into(self.sums, stats)

    def means(self, accelerator) -> dict[str, float]:
        """Means per step over all processes; empties the window."""
        out = {k: v / self.steps for k, v in global_sums(accelerator, self.sums).items()}
        self.sums, self.steps = {}, 0
        return out

    def state_dict(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: torch.tensor(v, device=self.device) for k, v in state["sums"].items()}
        self.steps = state["steps"]


def run(accelerator, folder, train, seed: int, model, optimizer, scheduler, task: Task, stage: str) -> dict:
    """Train `model` for the recipe's steps; returns the final metrics (last train + last eval)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(task.n_train, train)
    per_epoch = steps_per_epoch(task.n_train, train.batch_size)
    guard, window = StepGuard(train), Window(accelerator.device)
    scaffold = Scaffold(accelerator, folder, train, steps, stage, {"model": model}, {"model": optimizer},
                        {"model": scheduler}, stateful={"guard": guard, "window": window})
    scaffold.state.setdefault("best", None)
    model.train()
    for step in scaffold.steps():
        epoch, in_epoch = divmod(step, per_epoch)
        started = time.perf_counter()
        # 1. which examples each process sees; 2. the step's global denominators
        micros = plan_batches(task.n_train, train.batch_size, train.micro_batch_size, rank, world, seed, epoch,
                              in_epoch, task.lengths)
        local: dict[str, float] = {}
        for idx in micros:
            for k, v in task.weights(idx).items():
                local[k] = local.get(k, 0.0) + v
        den = global_sums(accelerator, local)
        # 3. forward/backward every micro-batch
        loss_total = torch.zeros((), device=accelerator.device)
        for i, idx in enumerate(micros):
            with micro_batch(accelerator, [model], last=i == len(micros) - 1):
                with accelerator.autocast():
                    loss, stats = task.micro_loss(idx, den)
                # DDP averages gradients over processes; our loss is this process's share of the global mean
                accelerator.backward(loss * world)
            loss_total += loss.detach().float()
            window.add(stats)
        # 4. clip, check, step
        loss_value = float(global_sum(accelerator, loss_total))
        step_stats = optimizer_step(accelerator, {"train": (model, optimizer, scheduler)}, train.max_grad_norm,
                                    guard, step + 1, loss_value)
        elapsed = time.perf_counter() - started

        # 5. log, evaluate
        window.steps += 1
        if (step + 1) % train.log_every == 0 or step + 1 == steps:
            reduced = window.means(accelerator)  # train/* figures: means over the steps since the last log line
            if task.finalize:
                reduced = task.finalize(reduced)
            metrics = {f"train/{k}": v for k, v in reduced.items()}
            metrics.update(step_stats)
            metrics["train/epoch"] = (step + 1) / per_epoch
            metrics["perf/step_time_s"] = elapsed
            progress = {k: f"{reduced[k]:.4g}" for k in task.progress if k in reduced}
            if "tokens" in den:
                metrics["perf/trained_tokens_per_s"] = den["tokens"] / max(elapsed, 1e-9)
                progress["tok/s"] = f"{metrics['perf/trained_tokens_per_s']:.0f}"
            metrics["train/nonfinite_skipped"] = guard.skipped
            scaffold.log(step + 1, metrics, progress)
        if task.n_eval and ((train.eval_every and (step + 1) % train.eval_every == 0) or step + 1 == steps):
            ev = evaluate(accelerator, model, task, train.micro_batch_size)
            scaffold.log(step + 1, ev)
            best = scaffold.state["best"]
            if task.best_key and task.best_key in ev and (best is None or ev[task.best_key] < best):
                scaffold.state["best"] = ev[task.best_key]
                if task.on_best is not None:
                    task.on_best()
    final = scaffold.close()
    guard.check_trained()  # a run in which every step was skipped (non-finite) must not finish
    final["train/steps"] = steps
    return final
