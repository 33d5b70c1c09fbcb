"""Gold-scored evaluation and the over-optimization monitor.

The reward model is a proxy. When held-out prompts carry a program-checkable answer (the task suite's
`task` + `answer`), `gold_sums`/`gold_metrics` measure what the proxy stands for; the monitor warns when the proxy
score rises while gold accuracy falls (reward hacking, Gao et al. 2022) or the KL leaves its budget.
"""

from __future__ import annotations

import math
import sys

from data_formats.tasks import grade, has_gold
from rlhf.rollout import complete
from rlhf.runtime import global_sums


def gold_sums(model, tokenizer, prompts: list[dict], cfg, device, scorer=None, seed: int = 0, first: int = 0,
              batches: int = 0, synced: bool = False, stop_ids: list[int] | None = None) -> dict[str, float]:
    """Gold-scoring counts for `prompts` ({'prompt_ids', 'meta', 'prompt', 'record'}), which may be one process's
    shard: {'correct', 'graded', 'ended', 'rows'(, 'proxy' summed)}. Add them over processes, then `gold_metrics`.
    Every call draws the same per-prompt noise (seeded decoder): changes are the policy's, not the dice's.
    `model`: a module or an `rlhf.rollout.Engine`; `first`, `batches`, `synced`, `stop_ids`: see
    `rlhf.rollout.complete`."""
    rows = complete(model, tokenizer, [p["prompt_ids"] for p in prompts], cfg, device, seed=seed, first=first,
                    batches=batches, synced=synced, stop_ids=stop_ids)
    graded = [grade(p["meta"], r["completion"]) for p, r in zip(prompts, rows) if has_gold(p["meta"])]
    out = {"correct": float(sum(graded)), "graded": float(len(graded)),
           "ended": float(sum(r["ended"] for r in rows)), "rows": float(len(rows))}
    if scorer is not None:
        proxy = scorer.score_responses(prompts, [r["completion"] for r in rows], [r["ended"] for r in rows])
        out["proxy"] = float(proxy.sum())
    return out


def gold_metrics(sums: dict[str, float]) -> dict[str, float]:
    """gold/accuracy, gold/eos_rate (and gold/proxy_score) from `gold_sums` (of one or all processes)."""
    out = {"gold/accuracy": sums["correct"] / sums["graded"] if sums["graded"] else float("nan"),
           "gold/eos_rate": sums["ended"] / max(sums["rows"], 1.0)}
    if "proxy" in sums:
        out["gold/proxy_score"] = sums["proxy"] / max(sums["rows"], 1.0)
    return out


def gold_check(accelerator, engine, tokenizer, prompts: list[dict], cfg, scorer, seed: int, monitor,
               stop_ids: list[int], step: int, kl: float) -> dict[str, float]:
    """Gold accuracy and proxy score of the policy that `engine` (`rlhf.rollout.Engine`) decodes, on the held-out
    `prompts`, with the monitor's warnings (printed by the main process; every process keeps the monitor's state).
    Every process decodes a contiguous shard (sharded weights need all of them in each forward) and the counts are
    summed."""
    world, rank, n = accelerator.num_processes, accelerator.process_index, len(prompts)
    lo, hi = rank * n // world, (rank + 1) * n // world
    calls = math.ceil(math.ceil(n / world) / cfg.batch_size)  # the largest shard's; every process makes as many
    sums = gold_sums(engine, tokenizer, prompts[lo:hi], cfg, accelerator.device, scorer, seed, first=lo, batches=calls,
                     synced=True, stop_ids=stop_ids)
    out = gold_metrics(global_sums(accelerator, sums))
    warnings = monitor.check(step, out, kl)
    if warnings:
        out["monitor/warnings"] = len(warnings)
    for warning in warnings if accelerator.is_main_process else []:
        print(f"warning: {warning}", file=sys.stderr)
    return out


class OverOptimizationMonitor:
    """Remembers the last gold evaluation and returns warnings for the current one."""

    def __init__(self, kl_budget: float, tolerance: float = 0.02):
        self.kl_budget = kl_budget
        self.tolerance = tolerance  # gold must fall by more than this to count as falling
        self.last: dict | None = None

    def check(self, step: int, metrics: dict, kl: float) -> list[str]:
        warnings = []
        gold, proxy = metrics.get("gold/accuracy"), metrics.get("gold/proxy_score")
        if self.last is not None and gold is not None and proxy is not None:
            if proxy > self.last["proxy"] and gold < self.last["gold"] - self.tolerance:
                warnings.append(f"step {step}: proxy score rose {self.last['proxy']:.3f} -> {proxy:.3f} while gold "
                                f"accuracy fell {self.last['gold']:.3f} -> {gold:.3f} (over-optimization?)")
        if kl > self.kl_budget:
            warnings.append(f"step {step}: KL {kl:.2f} nats is over the budget {self.kl_budget:g} "
                            f"(ppo.kl_budget); raise ppo.kl_coef or use kl_control: adaptive")
        if gold is not None and proxy is not None:
            self.last = {"gold": gold, "proxy": proxy}
        return warnings

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last")
