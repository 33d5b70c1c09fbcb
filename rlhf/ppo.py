"""The pieces of one PPO iteration that touch models: the four roles, scoring, the no-grad passes, the
update epochs.

The math they call is in `rlhf.losses`; the order of the phases is in `stages/ppo.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from rlhf.errors import UserError
from rlhf.forward import response_logprobs
from rlhf.losses import masked_mean, ppo_policy_loss, ppo_value_loss
from rlhf.data import plan_batches
from rlhf.models import (ScalarHead, count_parameters, disable_dropout, load_frozen, load_trainable, module_bytes,
                         position_ids_from_mask, reference_model, score_head)
from rlhf.rollout import generate_batches, row_keys
from rlhf.optim import build_optimizer, build_scheduler, optimizer_step
from rlhf.runtime import global_sum, global_sums, micro_batch
from rlhf.scoring import RewardScorer, load_scorer


# --- the four roles (Ouyang et al. 2022; the seeds' walk-through, 004: actor, critic, reference, reward) -----


@dataclass
class Roles:
    actor: torch.nn.Module  # trained; starts as the SFT model (LoRA-wrapped unless lora is null)
    critic: ScalarHead  # trained; the reward model's (or the SFT model's) backbone + a value head
    reference: torch.nn.Module | None  # frozen SFT copy; None under LoRA: the actor with its adapter disabled
    scorer: RewardScorer  # the frozen reward model


def check_launch(accelerator) -> None:
    """PPO trains two models, and accelerate's DeepSpeed plugin prepares one."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("PPO trains two models, which accelerate cannot prepare under DeepSpeed; launch it under "
                        "DDP or FSDP (recipes/accelerate/fsdp.yaml)")


def load_roles(recipe, tokenizer, device) -> Roles:
    """Load the four models of a PPO recipe, dropout off, actor and critic in train mode."""
    model_section, ppo, lora = recipe.model, recipe.ppo, recipe.lora
    actor = load_trainable(model_section, lora, tokenizer)
    reference = load_frozen(model_section, tokenizer, device) if lora is None else None
    scorer = load_scorer(ppo.reward_model, device, dtype=model_section.dtype, key="ppo.reward_model")
    if ppo.critic_init == "reward":
        if not scorer.same_vocab(tokenizer):
            raise UserError("the reward model's tokenizer differs from the actor's; the critic cannot start from "
                            "it (use ppo.critic_init: actor)", None, "ppo.critic_init")
        critic = load_trainable(model_section, lora, tokenizer, "seq_cls", ppo.reward_model, "ppo.reward_model")
    else:
        critic = load_trainable(model_section, lora, tokenizer, "seq_cls")
    critic = ScalarHead(critic, bias=True)
    disable_dropout(actor, critic, scorer.model, *([reference] if reference is not None else []))
    # from_pretrained returns eval mode, and HF layers recompute activations (gradient checkpointing) only
    # in train mode; with dropout off, train mode changes nothing else. Generation switches to eval itself.
    actor.train()
    critic.train()
    return Roles(actor, critic, reference, scorer)


def reward_stats_of(accelerator, ppo, scorer, policy, prompts: list[dict], generate, tokenizer, seed: int
                    ) -> dict | None:
    """The mean/std that normalize reward-model scores in this run (None: `ppo.normalize_reward` is off).

    `ppo.reward_stats: rm_data`: what the rm stage stored (fitted on its held-out completions). `policy`: measured
    on the starting policy's own samples before any update, as lm-human-preferences does (Ziegler et al. 2019),
    so that its normalized scores have mean 0 and std 1 and `kl_coef`, `missing_eos_penalty` and `reward_clip`
    mean the same for any reward model: the first `ppo.reward_stats_prompts` prompts of the first epoch's order
    (default: the first rollout batch, sampled with that rollout's noise), sharded over the processes."""
    if not ppo.normalize_reward:
        return None
    if ppo.reward_stats == "rm_data":
        if scorer.stored_stats is None:
            raise UserError(f"{ppo.reward_model} stores no mean/std of its scores (it is not an rm run); set "
                            "ppo.reward_stats: policy to measure them, or ppo.normalize_reward: false", None,
                            "ppo.reward_stats")
        return dict(scorer.stored_stats)
    world, rank = accelerator.num_processes, accelerator.process_index
    count = min(ppo.reward_stats_prompts or ppo.rollout_batch_size, len(prompts))
    shard = -(-count // world)
    mine = (plan_batches(len(prompts), count, shard, rank, world, seed, 0, 0) or [[]])[0]
    raw = [torch.zeros(0, device=accelerator.device)]
    for start, gen in generate_batches(policy, [prompts[i]["prompt_ids"] for i in mine], generate,
                                       tokenizer.eos_token_id, tokenizer.pad_token_id, accelerator.device,
                                       row_keys(seed, 0, mine, accelerator.device), synced=True,
                                       min_batches=-(-shard // generate.batch_size)):
        chunk = mine[start:start + generate.batch_size]  # empty for a synced placeholder call
        raw.append(scorer.score_generation(gen, [prompts[i]["prompt"] for i in chunk], tokenizer)[:len(chunk)])
    raw = torch.cat(raw).float()
    total = global_sums(accelerator, {"n": raw.numel(), "sum": raw.sum(), "sq": (raw ** 2).sum()})
    mean = total["sum"] / max(total["n"], 1.0)
    std = math.sqrt(max(total["sq"] / max(total["n"], 1.0) - mean ** 2, 1e-12))
    return {"mean": mean, "std": max(std, 1e-6), "count": int(total["n"]), "fitted_on": "policy"}


def fold_normalization(critic: ScalarHead, mean: float, std: float) -> None:
    """Put a critic copied from the reward model on the normalized reward scale before any update:
    critic(x) = (RM(x) - mean) / std at every token, the head's weight (and bias) divided by std and the offset
    -mean / std in the critic's own bias (most heads have none). Otherwise the critic starts off by a constant
    that the clipped value loss takes many iterations to remove, biasing the last token's advantage."""
    head = score_head(critic.model)
    with torch.no_grad():
        head.weight.div_(std)
        if getattr(head, "bias", None) is not None:
            head.bias.div_(std)
        critic.bias.fill_(-mean / std)


def iterations_of(n_prompts: int, ppo, train) -> int:
    """PPO iterations of a recipe: `train.epochs` passes over the prompts, at most `train.max_steps`."""
    if n_prompts < ppo.rollout_batch_size:
        raise UserError(f"only {n_prompts} prompts, fewer than ppo.rollout_batch_size={ppo.rollout_batch_size}",
                        None, "ppo.rollout_batch_size")
    iterations = max(1, math.ceil(train.epochs * n_prompts / ppo.rollout_batch_size))
    return min(iterations, train.max_steps) if train.max_steps else iterations


def prepare_training(accelerator, roles: Roles, ppo, train, iterations: int):
    """AdamW and schedule for actor and critic (over every update of the run), prepared by accelerate:
    (actor, critic, optimizers, schedulers), the dicts keyed 'actor' and 'critic'."""
    updates = iterations * ppo.ppo_epochs * (ppo.rollout_batch_size // train.batch_size)
    optimizers = {"actor": build_optimizer(roles.actor.parameters(), train),
                  "critic": build_optimizer(roles.critic.parameters(), train, lr=ppo.critic_lr)}
    schedulers = {name: build_scheduler(optimizer, train, updates) for name, optimizer in optimizers.items()}
    actor, critic, optimizers["actor"], optimizers["critic"] = accelerator.prepare(
        roles.actor, roles.critic, optimizers["actor"], optimizers["critic"])
    return actor, critic, optimizers, schedulers


def memory_report(roles: Roles, device) -> str:
    """Bytes each role holds (the reference shares the actor's weights under LoRA)."""
    def gib(n: int) -> str:
        return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"

    trainable_actor, _ = count_parameters(roles.actor)
    trainable_critic, _ = count_parameters(roles.critic)
    return "\n".join([
        f"ppo roles on {device}:",
        f"  actor      {gib(module_bytes(roles.actor))}  ({trainable_actor / 1e6:.3f}M trainable)",
        "  reference  " + (gib(module_bytes(roles.reference)) if roles.reference is not None
                           else "shared with the actor (adapter disabled)"),
        f"  critic     {gib(module_bytes(roles.critic))}  ({trainable_critic / 1e6:.3f}M trainable)",
        f"  reward     {gib(module_bytes(roles.scorer.model))}  (frozen)"])


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
    raw_scores: torch.Tensor  # (B,) reward model, normalized
    scores: torch.Tensor  # (B,) after the missing-EOS penalty and clipping
    old_logprobs: torch.Tensor  # actor at rollout time
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate
    rewards: torch.Tensor  # -kl_coef * kl, + score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor


def critic_values(critic, sequences, attention_mask, prompt_width: int) -> torch.Tensor:
    """V(s_t) for each response token t: the head at the position just before it. (B, P+A) -> (B, A)"""
    values = critic(sequences, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, prompt_width - 1:-1]


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None,
                 reward_clip: float | None) -> torch.Tensor:
    """Subtract the penalty from responses that never produced EOS, then clip to ±reward_clip."""
    scores = raw
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~ended).to(raw.dtype)
    if reward_clip:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def no_grad_passes(actor, critic, reference, sequences, attention_mask, prompt_width: int, micro: int,
                   temperature: float, autocast) -> tuple[torch.Tensor, ...]:
    """Old actor logprobs, entropy and critic values, then reference logprobs (`rlhf.models.reference_model`:
    the frozen copy, or the actor with its adapter disabled), micro-batch by micro-batch, without gradients.
    Returns (old_logprobs, ref_logprobs, values, entropy), each (B, A) float32."""
    old, ref, values, entropy = [], [], [], []
    rows = range(0, sequences.shape[0], micro)
    with torch.no_grad(), autocast():
        for i in rows:
            s, a = sequences[i:i + micro], attention_mask[i:i + micro]
            lp, ent = response_logprobs(actor, s, a, prompt_width, temperature, with_entropy=True)
            old.append(lp.float())
            entropy.append(ent.float())
            values.append(critic_values(critic, s, a, prompt_width).float())
        with reference_model(actor, reference) as ref_model:
            for i in rows:
                s, a = sequences[i:i + micro], attention_mask[i:i + micro]
                ref.append(response_logprobs(ref_model, s, a, prompt_width, temperature)[0].float())
    return torch.cat(old), torch.cat(ref), torch.cat(values), torch.cat(entropy)


def global_whiten_stats(accelerator, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) variance of masked entries over all processes."""
    m = global_sums(accelerator, {"n": mask.sum(), "s": (x * mask).sum(), "q": (x * x * mask).sum()})
    mean = m["s"] / max(m["n"], 1.0)
    var = (m["q"] - m["n"] * mean ** 2) / max(m["n"] - 1.0, 1.0)
    return mean, var


# stats of ppo_policy_loss / ppo_value_loss, by how they combine over micro-batches and processes
_NORMALIZED = ("loss/policy", "loss/value", "policy/entropy")  # already divided by the global token count
_LOCAL_MEANS = ("policy/clipfrac", "policy/approx_kl", "policy/ratio_mean", "value/clipfrac", "value/mean")


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
           temperature: float, step: int, generator: torch.Generator) -> dict[str, float]:
    """K epochs x minibatches of the clipped PPO objective over `exp`; returns averaged stats.

    loss = L_clip + vf_coef * L_V - entropy_coef * H, each a token mean over the global minibatch; logprobs at
    the rollout's `temperature`. Stops the epochs early when the minibatch approx-KL (global mean) exceeds
    `ppo.early_stop_kl`.
    """
    world, rows_total, response_mask = accelerator.num_processes, exp.sequences.shape[0], exp.response_mask
    minibatches, micro = rows_total * world // train.batch_size, train.micro_batch_size
    offset = accelerator.process_index * rows_total
    sums: dict[str, torch.Tensor] = {}
    same_everywhere: dict[str, float] = {}  # grad norms are identical on every process after sync
    ratio_max = torch.zeros((), device=response_mask.device)
    updates, epochs_run = 0, 0
    for epoch in range(ppo.ppo_epochs):
        epochs_run += 1
        epoch_kl = torch.zeros((), device=response_mask.device)
        for m in torch.randperm(minibatches, generator=generator).tolist():
            rows = minibatch_rows(rows_total, offset, minibatches, epoch, m)
            # the global minibatch's token count: every loss below is a token mean over it
            tokens = global_sum(accelerator, response_mask[rows].sum()).to(response_mask.dtype)
            loss_sum = torch.zeros((), device=response_mask.device)
            for j in range(0, len(rows), micro):
                r = rows[j:j + micro]
                mask = response_mask[r]
                with micro_batch(accelerator, [actor, critic], last=j + micro >= len(rows)):
                    with accelerator.autocast():
                        logprobs, entropy = response_logprobs(actor, exp.sequences[r], exp.attention_mask[r],
                                                              exp.prompt_width, temperature, with_entropy=True,
                                                              entropy_grad=ppo.entropy_coef != 0)
                        values = critic_values(critic, exp.sequences[r], exp.attention_mask[r], exp.prompt_width)
                        pg_loss, pg = ppo_policy_loss(logprobs.float(), exp.old_logprobs[r], exp.advantages[r],
                                                      mask, ppo.clip_range, normalizer=tokens,
                                                      max_log_ratio=ppo.max_log_ratio)
                        vf_loss, vf = ppo_value_loss(values.float(), exp.old_values[r], exp.returns[r], mask,
                                                     ppo.clip_range_value, normalizer=tokens)
                        ent = masked_mean(entropy.float(), mask, normalizer=tokens)
                        loss = pg_loss + ppo.vf_coef * vf_loss - ppo.entropy_coef * ent
                    # DDP averages gradients over processes; the loss is this process's share of the global mean
                    accelerator.backward(loss * world)
                loss_sum += loss.detach()
                share = mask.sum() / tokens
                stats = {**pg, **vf, "policy/entropy": ent.detach()}
                for k in _NORMALIZED:
                    sums[k] = sums.get(k, 0.0) + stats[k]
                for k in _LOCAL_MEANS:
                    sums[k] = sums.get(k, 0.0) + stats[k] * share
                    if k == "policy/approx_kl":
                        epoch_kl = epoch_kl + stats[k] * share
                sums["policy/ratio_clamped"] = sums.get("policy/ratio_clamped", 0.0) + stats["policy/ratio_clamped"]
                ratio_max = torch.maximum(ratio_max, stats["policy/ratio_max"])
            loss_value = float(global_sum(accelerator, loss_sum))
            # one step for both models: a non-finite loss skips (and counts) the actor and critic update together
            out = optimizer_step(accelerator, {name: (model, optimizers[name], schedulers[name])
                                               for name, model in (("actor", actor), ("critic", critic))},
                                 train.max_grad_norm, guard, step, loss_value)
            for name in ("actor", "critic"):
                same_everywhere[f"{name}/grad_norm"] = same_everywhere.get(f"{name}/grad_norm", 0.0) + \
                    out[f"{name}/grad_norm"]
            updates += 1
        if ppo.early_stop_kl is not None:
            kl_now = float(global_sum(accelerator, epoch_kl)) / minibatches
            if kl_now > ppo.early_stop_kl:
                break
    out = {k: v / updates for k, v in global_sums(accelerator, sums).items()}
    out["policy/ratio_clamped"] = out["policy/ratio_clamped"] * updates  # a count over the whole update
    out["policy/ratio_max"] = float(accelerator.gather(ratio_max.reshape(1)).max())
    out.update({k: v / updates for k, v in same_everywhere.items()})
    out["policy/epochs"] = epochs_run
    return out


def rollout_metrics(accelerator, exp: Experience, kl_coef: float, rows_global: int,
                    generate_s: float) -> dict[str, float]:
    """Per-iteration figures of the rollout, over all processes (means per response unless noted);
    `generate_s`: the seconds the rollout took (for generated tokens per second)."""
    m = exp.response_mask
    sums = global_sums(accelerator, {
        "score": exp.raw_scores.sum(), "score_shaped": exp.scores.sum(), "kl": (exp.kl * m).sum(),
        "entropy": (exp.entropy * m).sum(), "tokens": m.sum(), "eos": exp.ended.float().sum(),
        "r": (exp.returns * m).sum(), "r2": (exp.returns ** 2 * m).sum(),
        "e": ((exp.returns - exp.old_values) * m).sum(), "e2": ((exp.returns - exp.old_values) ** 2 * m).sum()})
    n, tokens = float(rows_global), max(sums["tokens"], 1.0)
    var_r = sums["r2"] / tokens - (sums["r"] / tokens) ** 2
    var_e = sums["e2"] / tokens - (sums["e"] / tokens) ** 2
    return {
        "objective/score": sums["score"] / n,
        "objective/score_shaped": sums["score_shaped"] / n,
        "objective/kl": sums["kl"] / n,  # summed over tokens, mean over responses
        "objective/non_score_reward": -kl_coef * sums["kl"] / n,
        "objective/entropy": sums["entropy"] / tokens,  # per token
        "response/length": sums["tokens"] / n,
        "response/eos_rate": sums["eos"] / n,
        "value/explained_var": 1.0 - var_e / var_r if var_r > 0 else 0.0,
        "kl_coef": kl_coef,
        "perf/generate_tokens_per_s": sums["tokens"] / max(generate_s, 1e-9),
    }
