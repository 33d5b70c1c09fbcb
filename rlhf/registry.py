"""Registries of the algorithms a recipe can name: advantage estimators, policy losses, preference losses.

Each entry is registered once, next to its pure function (`rlhf.losses`, `rlhf.preference_losses`), with what the
rest of the code must know about it (does it need a critic, groups of k samples, whitening; is it reference-free,
length-normalised, paired). Recipe validation (`rlhf.sections`: the accepted names are the registry's keys),
`rlhf check`, `rlhf plan` and the help text read these entries, so a new algorithm is one registered function,
its test and a recipe (verl's `register_adv_est` / `register_policy_loss`; torchtune's `is_reference_free`).

Imports nothing but the standard library: the recipe sections import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

# How a statistic a loss returns combines over micro-batches, processes and the minibatches of an update:
#   sum:   already divided by the global count of the minibatch: summed, then averaged over the updates
#   mean:  a mean local to the micro-batch: weighted by its share of the minibatch's tokens, then as `sum`
#   total: a count: summed over the whole update
#   max:   the largest value over the whole update
Reduction = Literal["sum", "mean", "total", "max"]


@dataclass(frozen=True)
class AdvantageEstimator:
    """(rewards, values, mask, *, gamma, gae_lambda, group_size, scale_by_std) -> (advantages, returns or None)."""

    fn: Callable
    help: str
    needs_critic: bool = False  # learns a value function (a critic role is loaded and trained)
    needs_groups: bool = False  # compares the k responses of one prompt: samples_per_prompt >= 2
    whiten: Literal["always", "never", "option"] = "never"  # option: ppo.whiten_advantages decides


@dataclass(frozen=True)
class PolicyLoss:
    """(logprobs, old_logprobs, advantages, mask, *, clip_range_low, clip_range_high, normalizer, max_log_ratio,
    loss_agg) -> (loss, stats); `stats` names how each of its statistics is reduced (nothing is dropped)."""

    fn: Callable
    help: str
    stats: dict[str, Reduction] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss of the preference stage, with what the stage must load and feed it."""

    fn: Callable
    help: str
    reference_free: bool = False  # no reference model is loaded (its log-probs are never computed)
    length_normalized: bool = False  # per-token mean log-probs instead of sums
    paired: bool = True  # chosen/rejected pairs; False: labelled single completions (KTO)
    nll_weight: float = 0.0  # weight of the chosen responses' NLL (per token) that is part of the loss (ORPO)


class Registry(dict):
    """name -> entry, filled by `register`; `help()` is the one-line help of a recipe key naming an entry."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, entry):
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def help(self) -> str:
        return "; ".join(f"{name} = {entry.help}" for name, entry in self.items())


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")  # keyed by ppo.ratio_level
PREFERENCE_LOSSES = Registry("preference loss")


def register_advantage(name: str, help: str, **meta) -> Callable:
    """Decorator: register a pure advantage estimator under `name` (ppo.advantage_estimator)."""
    return lambda fn: ADVANTAGE_ESTIMATORS.register(name, AdvantageEstimator(fn, help, **meta)).fn


def register_policy_loss(name: str, help: str, stats: dict[str, Reduction]) -> Callable:
    """Decorator: register a pure policy loss under `name` (ppo.ratio_level) with its statistics' reductions."""
    return lambda fn: POLICY_LOSSES.register(name, PolicyLoss(fn, help, stats)).fn


def register_preference_loss(name: str, help: str, **meta) -> Callable:
    """Decorator: register a pure preference loss under `name` (dpo.loss_type)."""
    return lambda fn: PREFERENCE_LOSSES.register(name, PreferenceLoss(fn, help, **meta)).fn
