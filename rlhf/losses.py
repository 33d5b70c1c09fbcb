"""The math of RLHF as pure functions of tensors.

No state, no config objects, no in-place edits of inputs, no host syncs: stats are detached 0-dim
tensors. Shapes: B batch, T tokens, A response tokens, V vocabulary. `mask` is 1 on real response
tokens. Losses are token-weighted masked means; `normalizer` replaces the local token count with the
global one of an accumulated, multi-process batch, so that summing per-micro-batch losses gives the
mean over the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.preference_losses import dpo_loss, pairwise_loss  # noqa: F401  (re-exported: the preference losses)
from rlhf.registry import register_advantage, register_policy_loss

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·mask (over `dim`, or everything)."""
    prod = x * mask.to(x.dtype)
    return prod.sum() if dim is None else prod.sum(dim)


def segment_sums(x: Tensor, segments: Tensor, n: int) -> Tensor:
    """Σ x per segment: out[s] = Σ_{i: segments_i = s} x_i for s in 0..n-1 (segment −1: dropped); how
    sequences packed into rows are summed. A masked sum per segment (deterministic on GPU, unlike index_add).
    x, segments: same shape (long ids) -> (n,)"""
    ids = torch.arange(n, device=segments.device)
    member = segments.reshape(1, -1) == ids[:, None]  # (n, N)
    return masked_sum(x.reshape(1, -1), member, dim=-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, normalizer: float | Tensor | None = None) -> Tensor:
    """Σ x·mask / Σ mask, token-weighted. `normalizer` (a global token count) replaces Σ mask.

    An empty mask gives 0, not NaN (the count is clamped to 1 only when it is 0).
    """
    total = masked_sum(x, mask, dim)
    if normalizer is not None:
        return total / normalizer
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    var = masked_sum((x - mean) ** 2, mask) / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, mean: float | Tensor | None = None,
                  var: float | Tensor | None = None) -> Tensor:
    """(x − mean) / sqrt(var + eps) over masked entries; 0 at masked-out positions.

    `mean`/`var` may be given (globally reduced over processes); otherwise they are computed here.
    """
    mean = masked_mean(x, mask) if mean is None else torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var = masked_var(x, mask) if var is None else torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


# How a per-token loss becomes one number (ppo.loss_agg), each over the whole minibatch on all processes (Liu et
# al. 2025, "Understanding R1-Zero-like training", sec. 3.1, and DAPO, Yu et al. 2025, sec. 3.3, on why it matters).
LOSS_AGGREGATIONS = {
    "token": "sum over the minibatch's tokens / its token count: every token weighs the same (DAPO)",
    "sequence": "each response's token mean, averaged over responses: every response weighs the same (GRPO)",
    "sequence_sum": "each response's token sum, averaged over responses",
    "constant": "token sum / (responses x generate.max_new_tokens): a constant denominator (Dr. GRPO)",
}


def loss_normalizer(loss_agg: str, tokens, responses, max_tokens: int):
    """The global count `aggregate_loss` divides by: the minibatch's tokens (token), responses (sequence,
    sequence_sum), or responses x max_tokens (constant). Numbers or 0-dim tensors, summed over processes."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")
    return {"token": tokens, "constant": responses * max_tokens}.get(loss_agg, responses)


def aggregate_loss(values: Tensor, mask: Tensor, loss_agg: str = "token",
                   normalizer: float | Tensor | None = None, max_tokens: int | None = None) -> Tensor:
    """One per-token loss (B, A) -> a scalar; the one place that decides how a loss is normalized.

    `token`: Σ values·mask / (number of tokens), every token weighs the same (long responses weigh more).
    `sequence`: the per-response token mean, then the mean over responses (every response weighs the same).
    `sequence_sum`: the per-response token sum, then the mean over responses.
    `constant`: Σ values·mask / (responses · max_tokens) (Dr. GRPO: the generation limit, not the length).
    `normalizer` replaces the local count (`loss_normalizer`: tokens, responses, responses · max_tokens) with the
    global one of an accumulated, multi-process minibatch, so that summing the micro-batches' losses gives the
    minibatch's.
    """
    if loss_agg == "token":
        return masked_mean(values, mask, normalizer=normalizer)
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")
    if loss_agg == "sequence":
        per_row = masked_mean(values, mask, dim=-1)  # (B,)
    else:
        per_row = masked_sum(values, mask, dim=-1)  # (B,)
    if normalizer is None:
        if loss_agg == "constant" and max_tokens is None:
            raise ValueError("loss_agg 'constant' needs max_tokens (generate.max_new_tokens)")
        normalizer = loss_normalizer(loss_agg, None, max(per_row.shape[0], 1), max_tokens or 1)
    return per_row.sum() / normalizer


def sequence_logps(logprobs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Σ_t logp_t·mask_t per row (or the per-token mean with `average`, as IPO uses). (B, T) -> (B,)"""
    total = masked_sum(logprobs, mask, dim=-1)
    if average:
        return total / mask.to(logprobs.dtype).sum(-1).clamp(min=1)
    return total


# ---------------------------------------------------------------------------------------------
# KL penalty and rewards (Stiennon et al. 2020, Ouyang et al. 2022: r_t = −β·KL_t, + score at the end)


def _k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # k1 = log π(y) − log π_ref(y): unbiased for KL(π‖π_ref) under samples of π, can be negative
    return logprobs - ref_logprobs


def _k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # k3 = (r − 1) − log r, r = π_ref/π: unbiased, always ≥ 0, low variance (Schulman 2020, "Approximating KL")
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k3": _k3}


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate between the policy and the reference. (B, A), (B, A) -> (B, A)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last nonzero entry of each row of a mask, left- or right-padded. (B, T) -> (B,)
    (0 for an empty row): the reward head's token in an attention mask, the score's token in a response mask."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask > 0).long()).argmax(-1)


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = −kl_coef·kl_t on response tokens, plus the score at each row's last response token.

    scores (B,), kl (B, A), mask (B, A) -> rewards (B, A). A row with an empty mask gets no score.
    """
    m = mask.to(kl.dtype)
    non_score = -kl_coef * kl * m
    has_tokens = m.sum(-1) > 0
    last = last_token_index(m)
    bonus = torch.zeros_like(non_score).scatter(1, last[:, None], (scores.to(kl.dtype) * has_tokens)[:, None])
    return non_score + bonus


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), scaled by `penalty`: 0 up to max_tokens − buffer
    tokens, then falling linearly to −penalty at max_tokens (and below it past the limit). lengths (B,) -> (B,)."""
    over = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0)
    return -penalty * over / max(buffer, 1)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling filter (Yu et al. 2025, eq. 11): a group of k responses to one prompt whose scores
    are all equal has zero advantage everywhere and teaches nothing. scores (B,) -> (B / k,) bool, True where the
    group's scores differ."""
    groups = scores.reshape(-1, group_size)
    return (groups != groups[:, :1]).any(dim=1)


# ---------------------------------------------------------------------------------------------
# advantages (Schulman et al. 2016, GAE, eq. 16)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float) -> tuple[Tensor, Tensor]:
    """δ_t = r_t + γ·V_{t+1} − V_t;  Â_t = δ_t + γλ·Â_{t+1};  returns = Â + V. All (B, A).

    Only response tokens count: V after a row's last real token is 0 (the episode ended), masked
    positions get advantage and return 0. Right-padded rows of different lengths are fine.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros_like(rewards[:, 0])
    # plain loop over time, vectorized over the batch:
    # for t in reversed(range(A)): delta = r[t] + γ V[t+1] m[t+1] − V[t]; A[t] = delta + γλ A[t+1] m[t+1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last_adv)
        next_mask = m[:, t + 1] if t + 1 < length else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last_adv = (delta + gamma * gae_lambda * last_adv * next_mask) * m[:, t]
        advantages[:, t] = last_adv
    returns = (advantages + values) * m
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# critic-free advantages: one sequence score per response, compared within the group of k responses sampled
# for the same prompt (rows of a group are contiguous: B = prompts × k), broadcast to every response token


def grpo_advantages(scores: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome supervision): Â_i = (r_i − mean(r)) / (std(r) + eps)
    over the group of the same prompt; std is the unbiased (Bessel-corrected, k − 1) sample standard deviation, as
    TRL and OpenRLHF compute it. `scale_by_std=False` only removes the group mean (Dr. GRPO, Liu et al. 2025: the
    std division over-weights prompts whose answers all score alike). scores (B,) -> (B,)."""
    groups = scores.reshape(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 8; Kool et al. 2019): Â_i = r_i − mean of the other k − 1 scores of the same
    prompt, an unbiased leave-one-out baseline. scores (B,) -> (B,); needs group_size ≥ 2."""
    groups = scores.reshape(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{s ≥ t} γ^(s−t)·r_s over each response's own tokens (0 outside the mask). (B, A) -> (B, A).
    REINFORCE++ (Hu 2025) uses it on the KL-shaped rewards, then whitens G over the global batch (no critic)."""
    m = mask.to(rewards.dtype)
    rewards = rewards * m
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    # plain loop over time, vectorized over the batch: G[t] = r[t] + γ G[t+1]
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        returns[:, t] = running
    return returns


# ---------------------------------------------------------------------------------------------
# the registered estimators (ppo.advantage_estimator): (rewards, values, mask, *, gamma, gae_lambda, group_size,
# scale_by_std) -> (advantages, returns or None). rewards: r_t = −kl_coef·kl_t (kl_in: reward) + the score at the
# last token; values: the critic's (estimators with needs_critic only). All (B, A).


@register_advantage("gae", "PPO with a critic (GAE)", needs_critic=True, whiten="option")
def gae_estimator(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, gae_lambda: float,
                  **_) -> tuple[Tensor, Tensor]:
    return gae(rewards, values, mask, gamma, gae_lambda)


@register_advantage("grpo", "critic-free, each response against its group's mean (and std: scale_by_std)",
                    needs_groups=True)
def grpo_estimator(rewards: Tensor, values, mask: Tensor, *, group_size: int, scale_by_std: bool,
                   **_) -> tuple[Tensor, None]:
    returns = masked_sum(rewards, mask, dim=-1)  # (B,) each response's summed reward
    return _per_token(grpo_advantages(returns, group_size, scale_by_std), mask)


@register_advantage("rloo", "critic-free, each response against the mean of the other k - 1 of its prompt",
                    needs_groups=True)
def rloo_estimator(rewards: Tensor, values, mask: Tensor, *, group_size: int, **_) -> tuple[Tensor, None]:
    return _per_token(rloo_advantages(masked_sum(rewards, mask, dim=-1), group_size), mask)


@register_advantage("reinforce_pp", "critic-free REINFORCE++ (returns whitened over the global batch)",
                    whiten="always")
def reinforce_pp_estimator(rewards: Tensor, values, mask: Tensor, *, gamma: float, **_) -> tuple[Tensor, None]:
    # REINFORCE++ (Hu 2025): the per-token KL-shaped return G_t, whitened over the global batch by the stage
    return discounted_returns(rewards, mask, gamma), None


def _per_token(sequence_advantages: Tensor, mask: Tensor) -> tuple[Tensor, None]:
    """A response's advantage (computed from its summed rewards, within its group) on each of its tokens."""
    return sequence_advantages[:, None] * mask, None


# ---------------------------------------------------------------------------------------------
# PPO losses (Schulman et al. 2017, eq. 7 and the clipped value loss of the PPO2 baselines)


POLICY_STATS = {"loss/policy": "sum", "policy/clipfrac": "mean", "policy/approx_kl": "mean",
                "policy/ratio_mean": "mean", "policy/ratio_max": "max", "policy/ratio_clamped": "total"}


@register_policy_loss("token", "PPO's clipped objective with a ratio per token", POLICY_STATS)
def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
                    normalizer: float | Tensor | None = None, max_log_ratio: float = 20.0,
                    loss_agg: str = "token", clip_range_high: float | None = None,
                    max_tokens: int | None = None) -> tuple[Tensor, dict]:
    """L = mean of max(−Â·ρ, −Â·clip(ρ, 1−ε_low, 1+ε_high)),  ρ = exp(logp − old_logp), aggregated as
    `aggregate_loss` says. ε_low = clip_range, ε_high = clip_range_high (None: the same; larger = DAPO's
    clip-higher, Yu et al. 2025, eq. 10). All (B, A).

    The log-ratio is clamped to ±max_log_ratio before exp so a ratio explosion gives a large but finite
    loss; clamped tokens are counted in `policy/ratio_clamped`.
    Stats (local to this micro-batch; their reductions: POLICY_STATS): `loss/policy`, `policy/clipfrac` (share of
    tokens where the clipped term is active), `policy/approx_kl` (mean ½(logp − old_logp)²), `policy/ratio_mean`,
    `policy/ratio_max`, `policy/ratio_clamped`.
    """
    log_ratio = logprobs - old_logprobs
    return _clipped_objective(log_ratio, log_ratio, advantages, mask, clip_range, clip_range_high, normalizer,
                              max_log_ratio, loss_agg, max_tokens)


@register_policy_loss("sequence", "GSPO: one ratio per response, exp of its mean token log-ratio, clipped per "
                                  "response", POLICY_STATS)
def gspo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
                     normalizer: float | Tensor | None = None, max_log_ratio: float = 20.0,
                     loss_agg: str = "token", clip_range_high: float | None = None,
                     max_tokens: int | None = None) -> tuple[Tensor, dict]:
    """GSPO (Zheng et al. 2025, eq. 5–7): s_i = exp((1/|y_i|) Σ_t (logp_t − old_logp_t)), the same ratio on every
    token of response i, clipped to [1−ε_low, 1+ε_high]; the rest as `ppo_policy_loss` (stats per token).
    All (B, A); with `loss_agg: sequence` it is the paper's per-response objective."""
    m = mask.to(logprobs.dtype)
    token_log_ratio = logprobs - old_logprobs
    seq_log_ratio = masked_sum(token_log_ratio, m, dim=-1) / m.sum(-1).clamp(min=1)  # (B,)
    return _clipped_objective(seq_log_ratio[:, None].expand_as(logprobs), token_log_ratio, advantages, mask,
                              clip_range, clip_range_high, normalizer, max_log_ratio, loss_agg, max_tokens)


def _clipped_objective(log_ratio: Tensor, token_log_ratio: Tensor, advantages: Tensor, mask: Tensor,
                       clip_range: float, clip_range_high: float | None, normalizer, max_log_ratio: float,
                       loss_agg: str, max_tokens: int | None) -> tuple[Tensor, dict]:
    """max(−Â·ρ, −Â·clip(ρ, 1−ε_low, 1+ε_high)) with ρ = exp(log_ratio) per token, aggregated; the stats of
    `ppo_policy_loss` (approx_kl from the per-token `token_log_ratio`). All (B, A)."""
    m = mask.to(log_ratio.dtype)
    high = clip_range if clip_range_high is None else clip_range_high
    clamped = (log_ratio.abs() > max_log_ratio) & (m > 0)
    ratio = torch.exp(log_ratio.clamp(-max_log_ratio, max_log_ratio))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), m, loss_agg, normalizer, max_tokens)
    with torch.no_grad():
        stats = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean((clipped > unclipped).to(m.dtype), m),
            "policy/approx_kl": masked_mean(0.5 * token_log_ratio ** 2, m),
            "policy/ratio_mean": masked_mean(ratio, m),
            "policy/ratio_max": (ratio * m).max() if m.numel() else torch.zeros(()),
            "policy/ratio_clamped": clamped.sum().to(m.dtype),
        }
    return loss, stats


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float,
                   normalizer: float | Tensor | None = None, loss_agg: str = "token",
                   max_tokens: int | None = None) -> tuple[Tensor, dict]:
    """L_V = ½ · mean of max((V − R)², (clip(V, V_old ± ε_v) − R)²), aggregated as `aggregate_loss`. All (B, A)."""
    m = mask.to(values.dtype)
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(err, err_clipped), m, loss_agg, normalizer, max_tokens)
    with torch.no_grad():
        stats = {"loss/value": loss.detach(), "value/clipfrac": masked_mean((err_clipped > err).to(m.dtype), m),
                 "value/mean": masked_mean(values, m)}
    return loss, stats


VALUE_STATS = {"loss/value": "sum", "value/clipfrac": "mean", "value/mean": "mean"}


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, normalizer: float | Tensor | None = None,
            loss_agg: str = "token", max_tokens: int | None = None) -> tuple[Tensor, dict]:
    """The KL to the reference as a loss term instead of a reward penalty (GRPO, Shao et al. 2024, eq. 4): the k3
    estimator exp(ref − logp) − (ref − logp) − 1 ≥ 0 of the current policy's logprobs (with gradient), aggregated
    as `aggregate_loss`. The caller weighs it with kl_coef. All (B, A)."""
    loss = aggregate_loss(_k3(logprobs, ref_logprobs), mask, loss_agg, normalizer, max_tokens)
    return loss, {"loss/kl": loss.detach()}


KL_STATS = {"loss/kl": "sum"}


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                                 cap: float) -> tuple[Tensor, dict]:
    """Truncated importance sampling (TIS) for a rollout engine whose sampler differs slightly from the trainer:
    w_t = min(exp(old_logprob_t − rollout_logprob_t), cap), 0 outside `mask`. All (B, A) -> (B, A).

    Each token's policy loss is weighted by w_t (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl's and TRL's vLLM TIS). The clipped surrogate is positively homogeneous in the
    advantage, so weighting a token's loss by w_t equals multiplying its advantage by w_t.
    Stats: `rollout/tis_weight_mean`, `rollout/tis_capped` (share of tokens at the cap)."""
    m = mask.to(old_logprobs.dtype)
    log_cap = torch.log(torch.tensor(cap, dtype=old_logprobs.dtype))
    capped = (old_logprobs - rollout_logprobs) >= log_cap
    weights = torch.exp((old_logprobs - rollout_logprobs).clamp(max=log_cap)) * m  # exp never overflows
    stats = {"rollout/tis_weight_mean": masked_mean(weights, m),
             "rollout/tis_capped": masked_mean(capped.to(m.dtype), m)}
    return weights, stats
