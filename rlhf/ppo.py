"""The pieces of one RL iteration that touch models: scoring, the advantage estimators, the no-grad passes,
the update epochs, the metrics. The models themselves are in `rlhf.roles`.

The math they call is in `rlhf.losses`; the order of the phases is in `stages/ppo.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from rlhf.data import load_gold_prompts
from rlhf.errors import UserError
from rlhf.forward import response_logprobs
from rlhf.losses import (KL_STATS, VALUE_STATS, aggregate_loss, kl_loss, loss_normalizer, overlong_penalty,
                         ppo_value_loss)
from rlhf.models import position_ids_from_mask, reference_model
from rlhf.optim import optimizer_step
from rlhf.prepared import prepare_prompts
from rlhf.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from rlhf.rewards import call_reward_fn, check_records, reward_fn_source
from rlhf.rollout import Generation, decode_responses
from rlhf.runtime import global_sum, global_sums, micro_batch


def load_prompts(recipe, tokenizer, folder) -> tuple[list[dict], list[dict]]:
    """The rollout prompts of `data` and the monitor's gold-scored prompts (`ppo.gold_prompts`), encoded; their
    counts and hashes (and the reward function's source file) go to the run's manifest."""
    ppo, data = recipe.ppo, recipe.data
    prompts, counts = prepare_prompts(data, tokenizer, recipe.seed)  # tokenized once, memory-mapped from the cache
    if ppo.reward_fn:
        check_records(ppo.reward_fn, prompts.metas())
    gold = load_gold_prompts(ppo.gold_prompts, data.template, tokenizer, data.max_prompt_len, ppo.gold_count,
                             recipe.seed) if ppo.gold_prompts and ppo.gold_every else []
    folder.counts = {**counts, "gold_prompts": len(gold)}
    for name, path in (("model", recipe.model.name_or_path), ("reward_model", ppo.reward_model),
                       ("data.train", data.train), ("ppo.gold_prompts", gold and ppo.gold_prompts),
                       ("ppo.reward_fn", ppo.reward_fn and reward_fn_source(ppo.reward_fn))):
        folder.input(name, path)
    return prompts, gold


def iterations_of(n_prompts: int, ppo, train) -> int:
    """PPO iterations of a recipe: `train.epochs` passes over the prompts, at most `train.max_steps`."""
    if n_prompts < ppo.rollout_batch_size:
        raise UserError(f"only {n_prompts} prompts, fewer than ppo.rollout_batch_size={ppo.rollout_batch_size}",
                        None, "ppo.rollout_batch_size")
    iterations = max(1, math.ceil(train.epochs * n_prompts / ppo.rollout_batch_size))
    return min(iterations, train.max_steps) if train.max_steps else iterations


def filtered_sampling_warning(generate) -> str | None:
    """The caveat of top-k / top-p rollouts, or None when sampling uses the full distribution."""
    if generate.temperature > 0 and (generate.top_k or generate.top_p < 1.0):
        return (f"warning: generate.top_k={generate.top_k} / top_p={generate.top_p:g} filter the sampling "
                "distribution, but logprobs, ratios and the KL penalty use the unfiltered (temperature-scaled) "
                "policy; they refer to that policy, not the one the responses were sampled from")
    return None


# --- one iteration -------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One process's share of an iteration, built once after GAE. (B, A) tensors over response tokens
    unless noted; every per-token tensor is 0 outside `response_mask`."""

    sequences: torch.Tensor  # (B, P + A) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P + A)
    prompt_width: int  # P
    response_mask: torch.Tensor  # float
    ended: torch.Tensor  # (B,) the response ends with EOS
    raw_scores: torch.Tensor  # (B,) the weighted sum of the reward sources (the model's normalized)
    scores: torch.Tensor  # (B,) after the missing-EOS penalty and clipping
    old_logprobs: torch.Tensor  # actor at rollout time
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor | None  # critic at rollout time (gae only)
    entropy: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate
    rewards: torch.Tensor  # -kl_coef * kl (kl_in: reward), + score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor | None  # the critic's targets (gae only)
    sources: dict  # (B,) score of each reward source before weighting: {"reward_model": ..., "reward_fn": ...}


def critic_values(critic, sequences, attention_mask, prompt_width: int) -> torch.Tensor:
    """V(s_t) for each response token t: the head at the position just before it. (B, P+A) -> (B, A)"""
    values = critic(sequences, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, prompt_width - 1:-1]


def overlong_scores(response_mask: torch.Tensor, ppo, max_new_tokens: int) -> torch.Tensor | None:
    """DAPO's overlong penalty of each response (`rlhf.losses.overlong_penalty`), or None when
    `ppo.overlong_buffer` is 0. response_mask (B, A) -> (B,)"""
    if not ppo.overlong_buffer:
        return None
    return overlong_penalty(response_mask.sum(-1), max_new_tokens, ppo.overlong_buffer, ppo.overlong_penalty)


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None,
                 reward_clip: float | None, overlong: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract the penalty from responses that never produced EOS, add the (negative) overlong penalty, then clip
    to ±reward_clip."""
    scores = raw
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~ended).to(raw.dtype)
    if overlong is not None:
        scores = scores + overlong.to(raw.dtype)
    if reward_clip:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def score_rollout(scorer, reward_fn, weights: dict, gen: Generation, batch: list[dict], tokenizer, fmt
                  ) -> tuple[torch.Tensor, dict]:
    """(B,) scores of a rollout: weights['reward_model'] x the reward model's (normalized) score + weights['reward_fn']
    x the reward function's, for the sources the recipe gives; and each source's own (B,) scores. `fmt`: the
    format the prompts are rendered in (a reward model reading another one scores through text)."""
    sources = {}
    if scorer is not None:
        sources["reward_model"] = scorer.score_generation(gen, batch, tokenizer, fmt).float()
    if reward_fn is not None:
        completions = decode_responses(tokenizer, gen)
        sources["reward_fn"] = call_reward_fn(reward_fn, [p["prompt"] for p in batch], completions,
                                              [p["meta"] for p in batch]).to(gen.sequences.device)
    if len(sources) == 1:  # one source: its scores as they are (a weight would only rescale kl_coef)
        return next(iter(sources.values())), sources
    return sum(weights.get(name, 1.0) * value for name, value in sources.items()), sources


# --- advantages: the registered estimator of ppo.advantage_estimator (`rlhf.losses`, `rlhf.registry`) ------------


def estimate_advantages(rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, ppo
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages, returns) of the recipe's estimator; returns is None without a critic. All (B, A)."""
    return ADVANTAGE_ESTIMATORS[ppo.advantage_estimator].fn(
        rewards, values, mask, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda, group_size=ppo.samples_per_prompt,
        scale_by_std=ppo.scale_by_std)


def whitened(ppo) -> bool:
    """Whether advantages are whitened over the global batch: as the estimator declares (reinforce_pp always, as
    part of the method; gae as `ppo.whiten_advantages` says; grpo / rloo never: normalised within each group)."""
    how = ADVANTAGE_ESTIMATORS[ppo.advantage_estimator].whiten
    return how == "always" or (how == "option" and ppo.whiten_advantages)


def no_grad_passes(actor, critic, reference, sequences, attention_mask, prompt_width: int, micro: int,
                   temperature: float, suppress_ids: tuple[int, ...], autocast,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Old actor logprobs, entropy and critic values, then reference logprobs (`rlhf.models.reference_model`:
    the frozen copy, or the actor with its adapter disabled), micro-batch by micro-batch, without gradients.
    Log-probs under the distribution the rollout sampled from (`temperature`, `suppress_ids` forbidden).
    Returns (old_logprobs, ref_logprobs, values, entropy), each (B, A) float32 (values None without a critic);
    log-probs and values are 0 outside `response_mask` (B, A)."""
    old, ref, values, entropy = [], [], [], []
    rows = range(0, sequences.shape[0], micro)
    with torch.no_grad(), autocast():
        for i in rows:
            s, a = sequences[i:i + micro], attention_mask[i:i + micro]
            lp, ent = response_logprobs(actor, s, a, prompt_width, temperature, with_entropy=True,
                                        suppress_ids=suppress_ids)
            old.append(lp.float())
            entropy.append(ent.float())
            if critic is not None:
                values.append(critic_values(critic, s, a, prompt_width).float())
        with reference_model(actor, reference) as ref_model:
            for i in rows:
                s, a = sequences[i:i + micro], attention_mask[i:i + micro]
                ref.append(response_logprobs(ref_model, s, a, prompt_width, temperature,
                                             suppress_ids=suppress_ids)[0].float())
    values = torch.cat(values) * response_mask if values else None
    return torch.cat(old) * response_mask, torch.cat(ref) * response_mask, values, torch.cat(entropy)


def global_whiten_stats(accelerator, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) variance of masked entries over all processes."""
    m = global_sums(accelerator, {"n": mask.sum(), "s": (x * mask).sum(), "q": (x * x * mask).sum()})
    mean = m["s"] / max(m["n"], 1.0)
    var = (m["q"] - m["n"] * mean ** 2) / max(m["n"] - 1.0, 1.0)
    return mean, var


class UpdateStats:
    """The statistics of an update's micro-batches, each reduced over micro-batches, processes and minibatches as
    the loss that returns it declares (`rlhf.registry.Reduction`); a statistic with no declared reduction is an
    error, never silently dropped."""

    def __init__(self, reductions: dict[str, str]):
        self.reductions = reductions
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor], share: torch.Tensor) -> None:
        """`share`: this micro-batch's share of the global minibatch's tokens (weighs the local means)."""
        for name, value in stats.items():
            how = self.reductions.get(name)
            if how is None:
                raise KeyError(f"the loss statistic {name!r} declares no reduction (rlhf.registry.Reduction)")
            if how == "max":
                self.maxima[name] = torch.maximum(self.maxima[name], value) if name in self.maxima else value
            else:
                self.sums[name] = self.sums.get(name, 0.0) + (value * share if how == "mean" else value)

    def reduce(self, accelerator, updates: int) -> dict[str, float]:
        out = {name: value if self.reductions[name] == "total" else value / updates
               for name, value in global_sums(accelerator, self.sums).items()}
        out.update({name: float(accelerator.gather(value.reshape(1)).max()) for name, value in self.maxima.items()})
        return out


def minibatch_rows(local_rows: int, offset: int, minibatches: int, epoch: int, m: int) -> list[int]:
    """Local row indices of this process in global minibatch `m` of `epoch`.

    Global row j (this process holds rows offset .. offset + local_rows - 1) belongs to minibatch
    (j + (j // M) * epoch) mod M. Every run of M consecutive rows gives one row to each minibatch, so
    each process holds the same share of every minibatch, and the partition is the same whatever the
    number of processes (1-process and N-process runs take identical update steps).
    """
    return [i for i in range(local_rows)
            if ((offset + i) + ((offset + i) // minibatches) * epoch) % minibatches == m]


def update(accelerator, actor, critic, optimizers: dict, schedulers: dict, guard, exp: Experience, ppo, train,
           temperature: float, suppress_ids: tuple[int, ...], kl_coef: float, step: int,
           generator: torch.Generator, max_new_tokens: int | None = None) -> dict[str, float]:
    """K epochs x minibatches of the clipped PPO objective over `exp`; returns averaged stats.

    loss = L_clip + vf_coef·L_V (with a critic) + kl_coef·KL (kl_in: loss) − entropy_coef·H, each aggregated over
    the global minibatch as `ppo.loss_agg` says (`rlhf.losses.aggregate_loss`; `constant` divides by
    `max_new_tokens` per response); the ratio per token or per response (`ppo.ratio_level`); logprobs under the
    rollout's distribution (`temperature`, `suppress_ids` forbidden). Stops the epochs early when the minibatch
    approx-KL (global mean) exceeds `ppo.early_stop_kl`.
    """
    world, rows_total, response_mask = accelerator.num_processes, exp.sequences.shape[0], exp.response_mask
    minibatches, micro = rows_total * world // train.batch_size, train.micro_batch_size
    offset = accelerator.process_index * rows_total
    models = {"actor": actor, **({"critic": critic} if critic is not None else {})}
    policy_loss, (clip_low, clip_high) = POLICY_LOSSES[ppo.ratio_level], ppo.clip_bounds()
    update_stats = UpdateStats({**policy_loss.stats, **VALUE_STATS, **KL_STATS, "policy/entropy": "sum"})
    same_everywhere: dict[str, float] = {}  # grad norms are identical on every process after sync
    updates, epochs_run = 0, 0
    for epoch in range(ppo.ppo_epochs):
        epochs_run += 1
        epoch_kl = torch.zeros((), device=response_mask.device)
        for m in torch.randperm(minibatches, generator=generator).tolist():
            rows = minibatch_rows(rows_total, offset, minibatches, epoch, m)
            # the global minibatch's count of tokens, or of responses (x max_new_tokens: constant), that every
            # loss is divided by
            tokens = global_sum(accelerator, response_mask[rows].sum()).to(response_mask.dtype)
            normalizer = tokens if ppo.loss_agg == "token" else loss_normalizer(
                ppo.loss_agg, tokens, global_sum(accelerator, float(len(rows))).to(response_mask.dtype), max_new_tokens)
            loss_sum = torch.zeros((), device=response_mask.device)
            for j in range(0, len(rows), micro):
                r = rows[j:j + micro]
                mask = response_mask[r]
                with micro_batch(accelerator, list(models.values()), last=j + micro >= len(rows)):
                    with accelerator.autocast():
                        logprobs, entropy = response_logprobs(actor, exp.sequences[r], exp.attention_mask[r],
                                                              exp.prompt_width, temperature, with_entropy=True,
                                                              entropy_grad=ppo.entropy_coef != 0,
                                                              suppress_ids=suppress_ids)
                        loss, stats = policy_loss.fn(logprobs.float(), exp.old_logprobs[r], exp.advantages[r], mask,
                                                     clip_range=clip_low, clip_range_high=clip_high,
                                                     normalizer=normalizer, max_log_ratio=ppo.max_log_ratio,
                                                     loss_agg=ppo.loss_agg, max_tokens=max_new_tokens)
                        ent = aggregate_loss(entropy.float(), mask, ppo.loss_agg, normalizer, max_new_tokens)
                        loss = loss - ppo.entropy_coef * ent
                        stats["policy/entropy"] = ent.detach()
                        if critic is not None:
                            values = critic_values(critic, exp.sequences[r], exp.attention_mask[r], exp.prompt_width)
                            vf_loss, vf = ppo_value_loss(values.float(), exp.old_values[r], exp.returns[r], mask,
                                                         ppo.clip_range_value, normalizer, ppo.loss_agg, max_new_tokens)
                            loss = loss + ppo.vf_coef * vf_loss
                            stats.update(vf)
                        if ppo.kl_in == "loss":
                            kl, kl_stats = kl_loss(logprobs.float(), exp.ref_logprobs[r], mask, normalizer,
                                                   ppo.loss_agg, max_new_tokens)
                            loss = loss + kl_coef * kl
                            stats.update(kl_stats)
                    # DDP averages gradients over processes; the loss is this process's share of the global mean
                    accelerator.backward(loss * world)
                loss_sum += loss.detach()
                share = mask.sum() / tokens
                update_stats.add(stats, share)
                epoch_kl = epoch_kl + stats["policy/approx_kl"] * share
            loss_value = float(global_sum(accelerator, loss_sum))
            # one step for every trained model: a non-finite loss skips (and counts) them all together
            out = optimizer_step(accelerator, {name: (model, optimizers[name], schedulers[name])
                                               for name, model in models.items()},
                                 train.max_grad_norm, guard, step, loss_value)
            for name in models:
                same_everywhere[f"{name}/grad_norm"] = same_everywhere.get(f"{name}/grad_norm", 0.0) + \
                    out[f"{name}/grad_norm"]
            updates += 1
        if ppo.early_stop_kl is not None:
            kl_now = float(global_sum(accelerator, epoch_kl)) / minibatches
            if kl_now > ppo.early_stop_kl:
                break
    out = update_stats.reduce(accelerator, updates)
    out.update({k: v / updates for k, v in same_everywhere.items()})
    out["policy/epochs"] = epochs_run
    return out


def rollout_metrics(accelerator, exp: Experience, kl_coef: float, rows_global: int,
                    generate_s: float) -> dict[str, float]:
    """Per-iteration figures of the rollout, over all processes (means per response unless noted);
    `generate_s`: the seconds the rollout took (for generated tokens per second)."""
    m = exp.response_mask
    scored = exp.scores * (m.sum(-1) > 0)  # a response with no token gets no score (kl_penalized_rewards)
    local = {"score": exp.raw_scores.sum(), "score_shaped": exp.scores.sum(), "kl": (exp.kl * m).sum(),
             "non_score": (exp.rewards * m).sum() - scored.sum(),
             "entropy": (exp.entropy * m).sum(), "tokens": m.sum(), "eos": exp.ended.float().sum(),
             **{f"source/{name}": value.sum() for name, value in exp.sources.items()}}
    if exp.old_values is not None:
        residual = exp.returns - exp.old_values
        local.update({"r": (exp.returns * m).sum(), "r2": (exp.returns ** 2 * m).sum(), "e": (residual * m).sum(),
                      "e2": (residual ** 2 * m).sum()})
    sums = global_sums(accelerator, local)
    n, tokens = float(rows_global), max(sums["tokens"], 1.0)
    out = {
        "objective/score": sums["score"] / n,
        "objective/score_shaped": sums["score_shaped"] / n,
        "objective/kl": sums["kl"] / n,  # summed over tokens, mean over responses
        "objective/non_score_reward": sums["non_score"] / n,  # the KL penalty in the reward (kl_in: reward)
        "objective/entropy": sums["entropy"] / tokens,  # per token
        "response/length": sums["tokens"] / n,
        "response/eos_rate": sums["eos"] / n,
        "kl_coef": kl_coef,
        "perf/generate_tokens_per_s": sums["tokens"] / max(generate_s, 1e-9),
    }
    if len(exp.sources) > 1:  # with several reward sources, each one's own mean score
        out.update({f"objective/{name}": sums[f"source/{name}"] / n for name in exp.sources})
    if exp.old_values is not None:
        var_r = sums["r2"] / tokens - (sums["r"] / tokens) ** 2
        var_e = sums["e2"] / tokens - (sums["e"] / tokens) ** 2
        out["value/explained_var"] = 1.0 - var_e / var_r if var_r > 0 else 0.0
    return out
