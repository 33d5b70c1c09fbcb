"""Gold-scored evaluation and the over-optimisation monitor.

The reward model is a proxy. When held-out prompts carry a program-checkable answer (the task suite's
`task` + `answer`), `gold_eval` measures what the proxy stands for; the monitor warns when the proxy
score rises while gold accuracy falls (reward hacking, Gao et al. 2022) or the KL leaves its budget.
"""

from __future__ import annotations

from data_formats.tasks import grade, has_gold
from rlhf.rollout import complete


def gold_eval(model, tokenizer, prompts: list[dict], cfg, device, scorer=None, seed: int = 0) -> dict:
    """Gold accuracy (and mean proxy score) of completions for `prompts` ({'prompt_ids', 'meta', 'prompt'}).
    The same per-prompt noise at every call (seeded decoder): changes are the policy's, not the dice's."""
    rows = complete(model, tokenizer, [p["prompt_ids"] for p in prompts], cfg, device, seed=seed)
    graded = [grade(p["meta"], r["completion"]) for p, r in zip(prompts, rows) if has_gold(p["meta"])]
    out = {"gold/accuracy": sum(graded) / len(graded) if graded else float("nan"),
           "gold/eos_rate": sum(r["ended"] for r in rows) / max(len(rows), 1)}
    if scorer is not None:
        texts = [p["prompt"] + r["completion"] for p, r in zip(prompts, rows)]
        out["gold/proxy_score"] = float(scorer(texts).mean())
    return out


class OverOptimisationMonitor:
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
                                f"accuracy fell {self.last['gold']:.3f} -> {gold:.3f} (over-optimisation?)")
        if kl > self.kl_budget:
            warnings.append(f"step {step}: KL {kl:.2f} nats is over the budget {self.kl_budget:g} "
                            f"(ppo.kl_target); raise ppo.kl_coef or use kl_control: adaptive")
        if gold is not None and proxy is not None:
            self.last = {"gold": gold, "proxy": proxy}
        return warnings

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last")
