"""The models of an RL run (Ouyang et al. 2022; the seeds' walk-through, 004): the actor, the critic (only the
`gae` estimator needs one), the frozen reference and the frozen reward model (absent when rewards come from
`ppo.reward_fn` alone). Loading, memory, optimizers, and putting reward scores (and the critic) on one scale.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from rlhf.data import warn_long_prompts
from rlhf.batching import plan_batches
from rlhf.errors import UserError
from rlhf.models import (ScalarHead, count_parameters, disable_dropout, load_frozen, load_trainable, module_bytes,
                         score_head)
from rlhf.optim import build_optimizer, build_scheduler
from rlhf.ppo import filtered_sampling_warning
from rlhf.rollout import generate_batches, row_keys
from rlhf.runtime import engine_line, global_sums
from rlhf.saving import save_model
from rlhf.scoring import RewardScorer, load_scorer, read_reward_stats

@dataclass
class Roles:
    actor: torch.nn.Module  # trained; starts as the SFT model (LoRA-wrapped unless lora is null)
    critic: ScalarHead | None  # trained (gae only); the reward model's (or the SFT model's) backbone + a value head
    reference: torch.nn.Module | None  # frozen SFT copy; None under LoRA: the actor with its adapter disabled
    scorer: RewardScorer | None  # the frozen reward model (None: rewards from ppo.reward_fn only)


def check_launch(accelerator, ppo) -> None:
    """PPO with a critic trains two models, and accelerate's DeepSpeed plugin prepares one."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED and ppo.needs_critic():
        raise UserError("PPO with a critic trains two models, which accelerate cannot prepare under DeepSpeed; "
                        "launch it under DDP or FSDP (recipes/accelerate/fsdp.yaml), or use a critic-free "
                        "ppo.advantage_estimator", None, "ppo.advantage_estimator")


def check_reward_stats(ppo) -> None:
    """`ppo.reward_stats: rm_data` takes the mean/std an rm run stores (an export keeps them, also on the hub): a
    reward model without them is a one-line error before any model loads."""
    if ppo.reward_model and ppo.normalize_reward and ppo.reward_stats == "rm_data" and \
            read_reward_stats(ppo.reward_model) is None:
        raise UserError(f"{ppo.reward_model} stores no mean/std of its scores (an rm run of this pipeline, or its "
                        "export, does); set ppo.reward_stats: policy to measure them on the starting policy's samples, "
                        "or ppo.normalize_reward: false", None, "ppo.reward_stats")


def load_roles(recipe, tokenizer, device) -> Roles:
    """Load the models a recipe needs, dropout off, actor and critic in train mode."""
    model_section, ppo, lora = recipe.model, recipe.ppo, recipe.lora
    check_reward_stats(ppo)
    actor = load_trainable(model_section, lora, tokenizer)
    reference = load_frozen(model_section, tokenizer, device) if lora is None else None
    scorer = load_scorer(ppo.reward_model, device, dtype=model_section.dtype, key="ppo.reward_model") \
        if ppo.reward_model else None
    critic = None
    if ppo.needs_critic():
        if ppo.critic_init == "reward":
            if not scorer.same_vocab(tokenizer):
                raise UserError("the reward model's tokenizer differs from the actor's; the critic cannot start "
                                "from it (use ppo.critic_init: actor)", None, "ppo.critic_init")
            critic = load_trainable(model_section, lora, tokenizer, "seq_cls", ppo.reward_model, "ppo.reward_model")
        else:
            critic = load_trainable(model_section, lora, tokenizer, "seq_cls")
        critic = ScalarHead(critic, bias=True)
    disable_dropout(*[m for m in (actor, critic, scorer and scorer.model, reference) if m is not None])
    # from_pretrained returns eval mode, and HF layers recompute activations (gradient checkpointing) only
    # in train mode; with dropout off, train mode changes nothing else. Generation switches to eval itself.
    for model in (actor, critic):
        if model is not None:
            model.train()
    return Roles(actor, critic, reference, scorer)


def prepare_training(accelerator, roles: Roles, ppo, train, iterations: int) -> tuple[dict, dict, dict]:
    """AdamW and schedule for the trained models (over every update of the run), prepared by accelerate:
    (models, optimizers, schedulers), dicts keyed 'actor' (and 'critic')."""
    episodes = ppo.rollout_batch_size * ppo.samples_per_prompt
    updates = iterations * ppo.ppo_epochs * (episodes // train.batch_size)
    trained = {"actor": roles.actor, **({"critic": roles.critic} if roles.critic is not None else {})}
    optimizers = {name: build_optimizer(model.parameters(), train, lr=ppo.critic_lr if name == "critic" else None)
                  for name, model in trained.items()}
    schedulers = {name: build_scheduler(optimizer, train, updates) for name, optimizer in optimizers.items()}
    # one model per `prepare` call: accelerate's FSDP2 takes one model (and its optimizer) at a time
    prepared = {name: accelerator.prepare(model, optimizers[name]) for name, model in trained.items()}
    return {name: pair[0] for name, pair in prepared.items()}, {name: pair[1] for name, pair in prepared.items()}, \
        schedulers


def reward_scale(accelerator, recipe, roles: Roles, critic, engine, prompts: list[dict], tokenizer, stop_ids: list[int],
                 fmt) -> dict | None:
    """At the start of a run: the statistics that normalize the reward model's scores (`reward_stats_of`), and a
    critic copied from the reward model put on that scale (`fold_normalization`). Returns the statistics."""
    stats = reward_stats_of(accelerator, recipe.ppo, roles.scorer, engine, prompts, recipe.generate, tokenizer,
                            recipe.seed, stop_ids, fmt)
    if stats and critic is not None and recipe.ppo.critic_init == "reward":
        fold_normalization(accelerator.unwrap_model(critic), stats["mean"], stats["std"])
    return stats


def reward_stats_of(accelerator, ppo, scorer, engine, prompts: list[dict], generate, tokenizer, seed: int,
                    stop_ids: list[int], fmt) -> dict | None:
    """The mean/std that normalize reward-model scores in this run (None: `ppo.normalize_reward` is off, or there
    is no reward model).

    `ppo.reward_stats: rm_data`: what the rm stage stored (fitted on its held-out completions). `policy`: measured
    on the starting policy's own samples before any update, as lm-human-preferences does (Ziegler et al. 2019),
    so that its normalized scores have mean 0 and std 1 and `kl_coef`, `missing_eos_penalty` and `reward_clip`
    mean the same for any reward model: the first `ppo.reward_stats_prompts` prompts of the first epoch's order
    (default: the first rollout batch, each prompt's `samples_per_prompt` responses sampled with that rollout's
    noise), sharded over the processes. `stop_ids`: where the policy's responses end; `fmt`: the prompts' format."""
    if not ppo.normalize_reward or scorer is None:
        return None
    if ppo.reward_stats == "rm_data":
        check_reward_stats(ppo)
        return dict(scorer.stored_stats)
    world, rank, k = accelerator.num_processes, accelerator.process_index, ppo.samples_per_prompt
    count = min(ppo.reward_stats_prompts or ppo.rollout_batch_size, len(prompts))
    shard = -(-count // world)
    mine = (plan_batches(len(prompts), count, shard, rank, world, seed, 0, 0) or [[]])[0]
    rows, keys = episodes(mine, k)
    raw = [torch.zeros(0, device=accelerator.device)]
    for start, gen in generate_batches(engine, [prompts[i]["prompt_ids"] for i in rows], generate,
                                       row_keys(seed, 0, keys, accelerator.device), synced=True,
                                       min_batches=-(-shard * k // generate.batch_size)):
        chunk = rows[start:start + generate.batch_size]  # empty for a synced placeholder call
        raw.append(scorer.score_generation(gen, [prompts[i] for i in chunk], tokenizer, fmt)[:len(chunk)])
    raw = torch.cat(raw).float()
    total = global_sums(accelerator, {"n": raw.numel(), "sum": raw.sum(), "sq": (raw ** 2).sum()})
    mean = total["sum"] / max(total["n"], 1.0)
    std = math.sqrt(max(total["sq"] / max(total["n"], 1.0) - mean ** 2, 1e-12))
    return {"mean": mean, "std": max(std, 1e-6), "count": int(total["n"]), "fitted_on": "policy"}


def rollout_rows(n_prompts: int, ppo, iteration: int, rank: int, world: int, seed: int) -> tuple[list, list]:
    """This process's rows of iteration `iteration` (`episodes` of its share of the epoch's prompt order, which
    `rlhf.batching.plan_batches` deals out), and the indices their sampling noise is keyed by."""
    per_epoch = n_prompts // ppo.rollout_batch_size
    (mine,) = plan_batches(n_prompts, ppo.rollout_batch_size, ppo.rollout_batch_size // world, rank, world, seed,
                           iteration // per_epoch, iteration % per_epoch)
    return episodes(mine, ppo.samples_per_prompt)


def episodes(prompt_indices: list[int], samples_per_prompt: int) -> tuple[list[int], list[int]]:
    """Rows of a rollout: each prompt index repeated k times (a prompt's group is contiguous), and the index each
    row's sampling noise is keyed by, prompt * k + sample (with k = 1: the prompt's index)."""
    rows = [i for i in prompt_indices for _ in range(samples_per_prompt)]
    keys = [i * samples_per_prompt + j for i in prompt_indices for j in range(samples_per_prompt)]
    return rows, keys


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


def save_trained(accelerator, folder: Path, actor, critic, tokenizer, recipe) -> dict:
    """Save the actor in `folder/model` (an adapter on the starting model, or full) and the critic in
    `folder/critic` (an adapter on its backbone's model, or full); returns their manifest entries and the
    rewards the run trained on."""
    model_section, ppo = recipe.model, recipe.ppo
    out = {"model_info": save_model(accelerator, actor, tokenizer, folder / "model", base=model_section.name_or_path),
           "rewards": {key: getattr(ppo, key) for key in ("advantage_estimator", "reward_model", "reward_fn",
                                                           "reward_weights")}}
    if critic is not None:
        base = ppo.reward_model if ppo.critic_init == "reward" else model_section.name_or_path
        out["critic_info"] = save_model(accelerator, critic, tokenizer, folder / "critic", base=base)
    return out


def startup_notes(accelerator, roles: Roles, prompts: list[dict], generate, device) -> None:
    """Before the first rollout: prompts too long for the actor's positions (generation cuts them from the left),
    then, from the main process, each role's memory and a note on filtered sampling."""
    warn_long_prompts(prompts, roles.actor, generate.max_new_tokens)
    if accelerator.is_main_process:
        report = memory_report(roles, device, engine_line(accelerator))
        print("\n".join(filter(None, [report, filtered_sampling_warning(generate)])),
              file=sys.stderr)


def memory_report(roles: Roles, device, engine: str) -> str:
    """Bytes each role holds (the reference shares the actor's weights under LoRA); only the roles held."""
    def gib(n: int) -> str:
        return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"

    def trained(model) -> str:
        return f"{gib(module_bytes(model))}  ({count_parameters(model)[0] / 1e6:.3f}M trainable)"

    lines = [f"ppo roles on {device} ({engine}):", f"  actor      {trained(roles.actor)}",
             "  reference  " + (gib(module_bytes(roles.reference)) if roles.reference is not None
                                else "shared with the actor (adapter disabled)")]
    if roles.critic is not None:
        lines.append(f"  critic     {trained(roles.critic)}")
    if roles.scorer is not None:
        lines.append(f"  reward     {gib(module_bytes(roles.scorer.model))}  (frozen)")
    return "\n".join(lines)
