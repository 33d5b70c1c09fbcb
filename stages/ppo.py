"""`ppo` stage: PPO with actor, critic, frozen reference and frozen reward model, written out by hand.

Each iteration, in the textbook order (Ouyang et al. 2022; the seeds' walk-through, 004):
  1. rollout   the actor samples responses (truncated after the first EOS)
  2. score     the frozen reward model scores prompt+response once (normalised, EOS penalty, clipped)
  3. old pass  actor logprobs, reference logprobs and critic values per response token (no grad)
  4. rewards   r_t = -kl_coef * kl_t, plus the score at the last response token
  5. GAE       advantages and returns; advantages whitened over the global batch
  6. update    K epochs x minibatches: clipped surrogate + clipped value loss - entropy bonus
  7. KL control fixed or adaptive coefficient
All the math is in `rlhf.losses` (pure functions, tested against plain loops).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm import tqdm

from data_formats.schemas import parse_prompt
from rlhf import checkpoint
from rlhf.artifacts import MetricsLog, RunFolder, expect_run
from rlhf.data import encode_prompts, load_gold_prompts, load_split, plan_batches, warn_long_prompts
from rlhf.errors import Interrupted, UserError
from rlhf.forward import response_logprobs
from rlhf.kl_control import KL_CONTROLLERS
from rlhf.losses import gae, kl_penalized_rewards, masked_whiten, per_token_kl
from rlhf.models import load_tokenizer
from rlhf.saving import save_model
from rlhf.monitor import OverOptimisationMonitor, gold_metrics, gold_sums
from rlhf.optim import StepGuard, build_optimizer, build_scheduler
from rlhf.ppo import (Experience, filtered_sampling_warning, global_whiten_stats, load_roles, memory_report,
                      no_grad_passes, rollout_metrics, shape_scores, update)
from rlhf.recipes import PPORecipe, derived
from rlhf.rollout import decode_responses, row_keys, sample
from rlhf.runtime import Interrupt, global_sum, global_sums, make_accelerator, seed_everything


def run(recipe: PPORecipe) -> Path:
    accelerator = make_accelerator(recipe.train.mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # one plugin cannot prepare actor and critic
        raise UserError("PPO trains two models, which accelerate cannot prepare under DeepSpeed; launch it under "
                        "DDP or FSDP (recipes/accelerate/fsdp.yaml)")
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    m, o, g, t = recipe.model, recipe.ppo, recipe.generate, recipe.train
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    expect_run(m.name_or_path, {"pretrain", "sft", "dpo", "ppo", "export"}, "model.name_or_path")

    # --- data: prompts (and gold-scored held-out prompts for the monitor) ---------------------------
    tokenizer = load_tokenizer(m.name_or_path, pad_token=m.pad_token, revision=m.revision,
                               trust_remote_code=m.trust_remote_code)
    split = load_split(recipe.data, parse_prompt, recipe.seed)
    prompts, prompt_counts = encode_prompts(split.train, tokenizer, recipe.data.max_prompt_len)
    gold_prompts = []
    if o.gold_prompts and o.gold_every:
        gold_prompts = load_gold_prompts(o.gold_prompts, recipe.data.template, tokenizer, recipe.data.max_prompt_len,
                                         o.gold_count, recipe.seed)
    folder.counts = {**split.counts, **prompt_counts, "gold_prompts": len(gold_prompts)}
    for name, path in (("model", m.name_or_path), ("reward_model", o.reward_model), ("data.train", recipe.data.train),
                       ("ppo.gold_prompts", o.gold_prompts if gold_prompts else None)):
        if path:
            folder.input(name, path)

    # --- the four roles: actor and critic trained (train mode), reference and reward frozen -----------
    roles = load_roles(recipe, tokenizer, device)  # under LoRA the reference is the actor, adapter disabled
    actor, critic, reference, reward = roles.actor, roles.critic, roles.reference, roles.reward
    warn_long_prompts(prompts, actor, g.max_new_tokens)
    if accelerator.is_main_process:
        print(memory_report(roles, device), file=sys.stderr)
        if warning := filtered_sampling_warning(g):
            print(f"warning: {warning}", file=sys.stderr)

    iterations = max(1, math.ceil(t.epochs * len(prompts) / o.rollout_batch_size))
    iterations = min(iterations, t.max_steps) if t.max_steps else iterations
    if len(prompts) < o.rollout_batch_size:
        raise UserError(f"only {len(prompts)} prompts, fewer than ppo.rollout_batch_size={o.rollout_batch_size}",
                        None, "ppo.rollout_batch_size")
    minibatches = o.rollout_batch_size // t.batch_size
    updates = iterations * o.ppo_epochs * minibatches
    actor_opt = build_optimizer(actor.parameters(), t)
    critic_opt = build_optimizer(critic.parameters(), t, lr=o.critic_lr)
    actor_sched = build_scheduler(actor_opt, t, updates)
    critic_sched = build_scheduler(critic_opt, t, updates)
    actor, critic, actor_opt, critic_opt = accelerator.prepare(actor, critic, actor_opt, critic_opt)
    kl_ctl = KL_CONTROLLERS[o.kl_control](o.kl_coef, o.kl_target, o.kl_horizon)
    monitor = OverOptimisationMonitor(o.kl_target)
    guard = StepGuard(t)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    per_rank = o.rollout_batch_size // world

    # --- resume ----------------------------------------------------------------------------------------
    modules, optimizers = {"actor": actor, "critic": critic}, {"actor": actor_opt, "critic": critic_opt}
    schedulers = {"actor": actor_sched, "critic": critic_sched}
    state = {"iteration": 0, "metrics_offset": None, "final": {}}
    if folder.resuming:
        folder.check_resume_recipe(checkpoint.read_state(folder.latest_checkpoint())["recipe_sha256"])
        saved = checkpoint.load(folder.latest_checkpoint(), accelerator, modules, optimizers, schedulers)
        kl_ctl.load_state_dict(saved["kl_controller"])
        monitor.load_state_dict(saved["monitor"])
        guard.load_state_dict(saved["guard"])
        state.update(saved)
        if accelerator.is_main_process:
            print(f"resuming from {folder.latest_checkpoint()} (iteration {state['iteration']} of {iterations})",
                  file=sys.stderr)
    log = MetricsLog(folder.partial, accelerator.is_main_process, state["metrics_offset"], state["iteration"])
    final = dict(state["final"])

    def save_checkpoint():
        state.update(metrics_offset=log.offset(), kl_controller=kl_ctl.state_dict(), monitor=monitor.state_dict(),
                     guard=guard.state_dict(), recipe_sha256=folder._hash(), final=final)
        checkpoint.save(folder.checkpoints, state["iteration"], accelerator, state, modules, optimizers, schedulers,
                        t.keep_checkpoints)

    def ref_logprobs_of(sequences, attention_mask, width):
        if reference is not None:
            return response_logprobs(reference, sequences, attention_mask, width, g.temperature or 1.0)[0]
        policy = accelerator.unwrap_model(actor)
        with policy.disable_adapter():
            return response_logprobs(policy, sequences, attention_mask, width, g.temperature or 1.0)[0]

    def gold_check(it: int, kl: float) -> dict:
        """Gold accuracy and proxy score on the held-out prompts, with the monitor's warnings. Every process
        decodes a contiguous shard (sharded weights need all of them in each forward) and the counts are
        summed; every process keeps the monitor's state, the main one prints."""
        n = len(gold_prompts)
        lo, hi = rank * n // world, (rank + 1) * n // world
        calls = math.ceil(math.ceil(n / world) / g.batch_size)  # the largest shard's; every process makes as many
        sums = gold_sums(accelerator.unwrap_model(actor), tokenizer, gold_prompts[lo:hi], g, device, reward,
                         recipe.seed, first=lo, batches=calls, synced=True)
        out = gold_metrics(global_sums(accelerator, sums))
        warnings = monitor.check(it, out, kl)
        if warnings:
            out["monitor/warnings"] = len(warnings)
        for warning in warnings if accelerator.is_main_process else []:
            print(f"warning: {warning}", file=sys.stderr)
        return out

    if gold_prompts and state["iteration"] == 0:
        log.log(0, gold_check(0, 0.0))  # the starting policy: the baseline the monitor compares against

    temperature = g.temperature or 1.0  # logprobs use the sampling temperature (greedy rollouts: 1)
    bar = tqdm(total=iterations, initial=state["iteration"], desc="ppo", disable=not accelerator.is_main_process,
               dynamic_ncols=True, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)
    with Interrupt() as interrupt, bar:
        while state["iteration"] < iterations:
            it = state["iteration"]
            per_epoch = len(prompts) // o.rollout_batch_size
            (mine,) = plan_batches(len(prompts), o.rollout_batch_size, per_rank, rank, world, recipe.seed,
                                   it // per_epoch, it % per_epoch)
            times = {}

            # 1. rollout: the actor samples; responses end at the first EOS ----------------------------------
            clock = time.perf_counter()
            keys = row_keys(recipe.seed, it, mine, device)  # samples independent of batching and process count
            gen = sample(accelerator.unwrap_model(actor), [prompts[i] for i in mine], g, eos_id, pad_id, device, keys,
                         synced=True)
            times["time/generate_s"] = time.perf_counter() - clock

            # 2. score prompt+response once with the frozen reward model --------------------------------------
            clock = time.perf_counter()
            if roles.same_vocab:
                raw = reward.score_ids(gen.sequences, gen.attention_mask)
            else:  # through text: the actor's real response tokens, EOS only where the response ended
                texts = [prompts[i]["prompt"] + c for i, c in zip(mine, decode_responses(tokenizer, gen))]
                raw = reward(texts, ended=gen.ended.tolist()).to(device)
            scores = shape_scores(raw, gen.ended, o.missing_eos_penalty, o.reward_clip)
            times["time/score_s"] = time.perf_counter() - clock

            # 3. old logprobs (actor), reference logprobs, values (critic): no grad ----------------------------
            clock = time.perf_counter()
            old_lp, ref_lp, old_values, entropy = no_grad_passes(
                accelerator.unwrap_model(actor), accelerator.unwrap_model(critic),
                lambda s, a: ref_logprobs_of(s, a, gen.prompt_width), gen.sequences, gen.attention_mask,
                gen.prompt_width, t.micro_batch_size, temperature, accelerator.autocast)
            mask = gen.response_mask.float()
            exp = Experience(gen.sequences, gen.attention_mask, gen.prompt_width, mask, gen.ended, raw, scores,
                             old_lp * mask, ref_lp * mask, old_values * mask, entropy)
            times["time/ref_values_s"] = time.perf_counter() - clock

            # 4. rewards: -kl_coef * KL per token, score at the last token; 5. GAE, whitened advantages -------
            exp.kl = per_token_kl(exp.old_logprobs, exp.ref_logprobs, o.kl_estimator) * mask
            exp.rewards, _ = kl_penalized_rewards(exp.scores, exp.kl, mask, kl_ctl.value)
            exp.advantages, exp.returns = gae(exp.rewards, exp.old_values, mask, o.gamma, o.gae_lambda)
            if o.whiten_advantages:
                mean, var = global_whiten_stats(accelerator, exp.advantages, mask)
                exp.advantages = masked_whiten(exp.advantages, mask, mean=mean, var=var)

            # 6. K epochs x minibatches of clipped updates of actor and critic --------------------------------
            clock = time.perf_counter()
            stats = update(accelerator, actor, critic, optimizers, schedulers, guard, exp,
                           _UpdateCfg(o, temperature), t, it + 1,
                           torch.Generator().manual_seed(recipe.seed * 7919 + it))
            times["time/update_s"] = time.perf_counter() - clock

            # 7. metrics, KL controller, gold monitor ----------------------------------------------------------
            metrics = rollout_metrics(accelerator, exp, kl_ctl.value, o.rollout_batch_size)
            metrics.update(stats)
            metrics.update(times)
            metrics["perf/generate_tokens_per_s"] = float(global_sum(accelerator, mask.sum())) / max(
                times["time/generate_s"], 1e-9)
            metrics["train/lr"] = schedulers["actor"].get_last_lr()[0]
            metrics["train/nonfinite_skipped"] = guard.skipped
            kl_ctl.update(metrics["objective/kl"], o.rollout_batch_size)
            state["iteration"] = it = it + 1
            if gold_prompts and (it % o.gold_every == 0 or it == iterations):
                metrics.update(gold_check(it, metrics["objective/kl"]))
            log.log(it, metrics)
            final.update(metrics)
            bar.set_postfix({"score": f"{metrics['objective/score']:.3f}", "kl": f"{metrics['objective/kl']:.3f}"},
                            refresh=False)
            bar.update(1)

            stop = float(global_sum(accelerator, float(interrupt.requested))) > 0 if world > 1 else interrupt.requested
            if (t.save_every and it % t.save_every == 0 and it < iterations) or stop:
                save_checkpoint()
            if stop:
                log.close()
                raise Interrupted(f"interrupted at iteration {it} of {iterations}; checkpoint saved")
    log.close()
    guard.check_trained()

    # --- artifacts: the actor (adapter on the sft model, or full) and the critic -----------------------
    info = save_model(accelerator, actor, tokenizer, folder.partial / "model", base=m.name_or_path)
    critic_info = save_model(accelerator, critic, tokenizer, folder.partial / "critic",
                             base=o.reward_model if o.critic_init == "reward" else m.name_or_path)
    final["train/iterations"] = iterations
    return folder.finish(final, extra={"model_info": info, "critic_info": critic_info,
                                       "kl_controller": kl_ctl.state_dict()}, derived=derived(recipe))


class _UpdateCfg:
    """The PPO section plus the rollout temperature, as `rlhf.ppo.update` reads them."""

    def __init__(self, ppo, temperature: float):
        self.__dict__.update(vars(ppo))
        self.temperature = temperature

