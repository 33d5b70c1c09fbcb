"""The pieces of one PPO iteration that touch models: the four roles, scoring, the no-grad passes, the
update epochs.

The math they call is in `rlhf.losses`; the order of the phases is in `stages/ppo.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from rlhf.errors import UserError
from rlhf.forward import response_logprobs
from rlhf.losses import masked_mean, ppo_policy_loss, ppo_value_loss
from rlhf.models import (ScalarHead, apply_lora, count_parameters, load_model, module_bytes,
                         position_ids_from_mask)
from rlhf.optim import optimizer_step
from rlhf.runtime import global_sum, global_sums, micro_batch
from rlhf.scoring import RewardScorer, load_scorer


# --- the four roles (Ouyang et al. 2022; the seeds' walk-through, 004: actor, critic, reference, reward) -----


@dataclass
class Roles:
    actor: torch.nn.Module  # trained; starts as the SFT model (LoRA-wrapped unless lora is null)
    critic: ScalarHead  # trained; the reward model's (or the SFT model's) backbone + a value head
    reference: torch.nn.Module | None  # frozen SFT copy; None under LoRA: the actor with its adapter disabled
    reward: RewardScorer  # frozen
    same_vocab: bool  # the reward model reads the actor's token ids as they are


def load_roles(recipe, tokenizer, device) -> Roles:
    """Load the four models of a PPO recipe, dropout off, actor and critic in train mode."""
    m, o, lora = recipe.model, recipe.ppo, recipe.lora
    load = dict(dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code,
                attn_implementation=m.attn_implementation, vocab=len(tokenizer),
                quantize_4bit=bool(lora and lora.quantization == "4bit"))
    actor = load_model(m.name_or_path, **load)
    reference = None
    if lora is None:
        reference = load_model(m.name_or_path, **load).to(device).eval().requires_grad_(False)
    reward = load_scorer(o.reward_model, device, dtype=m.dtype, normalize=o.normalize_reward, key="ppo.reward_model")
    same_vocab = reward.tokenizer.get_vocab() == tokenizer.get_vocab()
    if o.critic_init == "reward":
        if not same_vocab:
            raise UserError("the reward model's tokenizer differs from the actor's; the critic cannot start from "
                            "it (use ppo.critic_init: actor)", None, "ppo.critic_init")
        critic_backbone = load_model(o.reward_model, "ppo.reward_model", task="seq_cls", **load)
    else:
        critic_backbone = load_model(m.name_or_path, task="seq_cls", **load)
    if m.gradient_checkpointing:
        for model in (actor, critic_backbone):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        actor = apply_lora(actor, lora)
        critic_backbone = apply_lora(critic_backbone, lora, task="seq_cls")
    critic = ScalarHead(critic_backbone)
    disable_dropout(actor, critic, reward.model, *([reference] if reference is not None else []))
    # from_pretrained returns eval mode, and HF layers recompute activations (gradient checkpointing) only
    # in train mode; with dropout off, train mode changes nothing else. Generation switches to eval itself.
    actor.train()
    critic.train()
    return Roles(actor, critic, reference, reward, same_vocab)


def disable_dropout(*models) -> None:
    """Dropout off in every role: logprobs of the rollout and of the update must be comparable.

    `nn.Dropout` modules get p = 0. Attention dropout is applied functionally in train mode from a float
    the attention module copied from its config (Llama: `self.attention_dropout`), so every float attribute
    named *dropout* of every module, and of every config found on the way (peft's inner model included),
    is set to 0 as well.
    """
    def zero(obj) -> None:
        for name, value in list(vars(obj).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(obj, name, 0.0)
            elif isinstance(value, PretrainedConfig):  # a module's config, a config's sub-configs
                zero(value)

    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            zero(module)


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
        f"  reward     {gib(module_bytes(roles.reward.model))}  (frozen)"])


def filtered_sampling_warning(generate) -> str | None:
    """The caveat of top-k / top-p rollouts, or None when sampling uses the full distribution."""
    if generate.temperature > 0 and (generate.top_k or generate.top_p < 1.0):
        return (f"generate.top_k={generate.top_k} / top_p={generate.top_p:g} filter the sampling distribution, but "
                "logprobs, ratios and the KL penalty use the unfiltered (temperature-scaled) policy; they refer to "
                "that policy, not the one the responses were sampled from")
    return None


# --- one iteration -------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One process's share of an iteration. (B, A) tensors over response tokens unless noted."""

    sequences: torch.Tensor  # (B, P + A)
    attention_mask: torch.Tensor  # (B, P + A)
    prompt_width: int
    mask: torch.Tensor  # response_mask as float
    ended: torch.Tensor  # (B,)
    raw_scores: torch.Tensor  # (B,) reward model, normalised
    scores: torch.Tensor  # (B,) after EOS penalty and clipping
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


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


def no_grad_passes(actor, critic, ref_logprobs_fn, sequences, attention_mask, prompt_width: int, micro: int,
                   temperature: float, autocast) -> tuple[torch.Tensor, ...]:
    """Old actor logprobs (+ entropy), reference logprobs and critic values, micro-batch by micro-batch."""
    old, ref, values, entropy = [], [], [], []
    with torch.no_grad(), autocast():
        for i in range(0, sequences.shape[0], micro):
            s, a = sequences[i:i + micro], attention_mask[i:i + micro]
            lp, ent = response_logprobs(actor, s, a, prompt_width, temperature, with_entropy=True)
            old.append(lp.float())
            entropy.append(ent.float())
            ref.append(ref_logprobs_fn(s, a).float())
            values.append(critic_values(critic, s, a, prompt_width).float())
    return torch.cat(old), torch.cat(ref), torch.cat(values), torch.cat(entropy)


def global_whiten_stats(accelerator, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) variance of masked entries over all processes."""
    m = global_sums(accelerator, {"n": mask.sum(), "s": (x * mask).sum(), "q": (x * x * mask).sum()})
    mean = m["s"] / max(m["n"], 1.0)
    var = (m["q"] - m["n"] * mean ** 2) / max(m["n"] - 1.0, 1.0)
    return mean, var


# stats of ppo_policy_loss / ppo_value_loss, by how they combine over micro-batches and processes
_NORMALISED = ("loss/policy", "loss/value", "policy/entropy")  # already divided by the global token count
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


def update(accelerator, actor, critic, optimizers: dict, schedulers: dict, guard, exp: Experience, cfg, train,
           step: int, generator: torch.Generator) -> dict[str, float]:
    """K epochs x minibatches of the clipped PPO objective over `exp`; returns averaged stats.

    loss = L_clip + vf_coef * L_V - entropy_coef * H, each a token mean over the global minibatch.
    Stops the epochs early when the minibatch approx-KL (global mean) exceeds `cfg.target_kl`.
    """
    world, rows_total = accelerator.num_processes, exp.sequences.shape[0]
    minibatches, micro = rows_total * world // train.batch_size, train.micro_batch_size
    offset = accelerator.process_index * rows_total
    temperature = cfg.temperature
    sums: dict[str, torch.Tensor] = {}
    same_everywhere: dict[str, float] = {}  # grad norms are identical on every process after sync
    ratio_max = torch.zeros((), device=exp.mask.device)
    updates, epochs_run = 0, 0
    for epoch in range(cfg.ppo_epochs):
        epochs_run += 1
        epoch_kl = torch.zeros((), device=exp.mask.device)
        for m in torch.randperm(minibatches, generator=generator).tolist():
            rows = minibatch_rows(rows_total, offset, minibatches, epoch, m)
            tokens = global_sum(accelerator, exp.mask[rows].sum()).to(exp.mask.dtype)  # global minibatch tokens
            loss_sum = torch.zeros((), device=exp.mask.device)
            for j in range(0, len(rows), micro):
                r = rows[j:j + micro]
                mask = exp.mask[r]
                with micro_batch(accelerator, [actor, critic], last=j + micro >= len(rows)):
                    with accelerator.autocast():
                        logprobs, entropy = response_logprobs(actor, exp.sequences[r], exp.attention_mask[r],
                                                              exp.prompt_width, temperature, with_entropy=True,
                                                              entropy_grad=cfg.entropy_coef != 0)
                        values = critic_values(critic, exp.sequences[r], exp.attention_mask[r], exp.prompt_width)
                        pg_loss, pg = ppo_policy_loss(logprobs.float(), exp.old_logprobs[r], exp.advantages[r],
                                                      mask, cfg.clip_range, normalizer=tokens,
                                                      max_log_ratio=cfg.max_log_ratio)
                        vf_loss, vf = ppo_value_loss(values.float(), exp.old_values[r], exp.returns[r], mask,
                                                     cfg.clip_range_value, normalizer=tokens)
                        ent = masked_mean(entropy.float(), mask, normalizer=tokens)
                        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
                    # DDP averages gradients over processes; the loss is this process's share of the global mean
                    accelerator.backward(loss * world)
                loss_sum += loss.detach()
                share = mask.sum() / tokens
                stats = {**pg, **vf, "policy/entropy": ent.detach()}
                for k in _NORMALISED:
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
        if cfg.target_kl is not None:
            kl_now = float(global_sum(accelerator, epoch_kl)) / minibatches
            if kl_now > cfg.target_kl:
                break
    out = {k: v / updates for k, v in global_sums(accelerator, sums).items()}
    out["policy/ratio_clamped"] = out["policy/ratio_clamped"] * updates  # a count over the whole update
    out["policy/ratio_max"] = float(accelerator.gather(ratio_max.reshape(1)).max())
    out.update({k: v / updates for k, v in same_everywhere.items()})
    out["policy/epochs"] = epochs_run
    return out


def rollout_metrics(accelerator, exp: Experience, kl_coef: float, rows_global: int) -> dict[str, float]:
    """Per-iteration figures of the rollout, over all processes (means per response unless noted)."""
    m = exp.mask
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
    }
