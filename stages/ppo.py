"""`ppo` stage: PPO with actor, critic, frozen reference and frozen reward model, written out by hand.

Each iteration, in the textbook order (Ouyang et al. 2022; the seeds' walk-through, 004):
  1. rollout   the actor samples responses (truncated after the first stop token: EOS, end of turn)
  2. score     the frozen reward model scores prompt+response once (normalized, EOS penalty, clipped)
  3. old pass  actor logprobs, reference logprobs and critic values per response token (no grad)
  4. rewards   r_t = -kl_coef * kl_t, plus the score at the last response token
  5. GAE       advantages and returns; advantages whitened over the global batch
  6. update    K epochs x minibatches: clipped surrogate + clipped value loss - entropy bonus
  7. KL control fixed or adaptive coefficient
All the math is in `rlhf.losses` (pure functions, tested against plain loops); resume, logging, Ctrl-C and
checkpoints in `rlhf.scaffold`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from data_formats.chat import make_format
from rlhf.artifacts import RunFolder, check_parents
from rlhf.kl_control import KL_CONTROLLERS
from rlhf.losses import kl_penalized_rewards, masked_whiten, per_token_kl, truncated_importance_weights
from rlhf.tokenization import stop_token_ids, tokenizer_for
from rlhf.monitor import OverOptimizationMonitor, gold_check
from rlhf.optim import StepGuard
from rlhf.dynamic_sampling import Round, dynamic_sample
from rlhf.ppo import (Experience, estimate_advantages, global_whiten_stats, iterations_of, load_prompts,
                      no_grad_passes, overlong_scores, rollout_metrics, score_rollout, shape_scores, update, whitened)
from rlhf.rewards import load_reward_fn
from rlhf.roles import (check_launch, load_roles, prepare_training, reward_scale, rollout_rows, save_trained,
                        startup_notes)
from rlhf.recipes import PPORecipe, derived
from rlhf.context import RunContext
from rlhf.rollout import build_engine, row_keys, sample, sampler_mismatch
from rlhf.runtime import engine_figures, make_accelerator, seed_everything
from rlhf.scaffold import Scaffold, Stopwatch
from rlhf.vllm_engine import check_installed


def run(recipe: PPORecipe) -> Path:
    accelerator = make_accelerator(recipe)
    check_launch(accelerator, recipe.ppo)
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    check_parents(recipe)
    model_section, ppo, generate, train = recipe.model, recipe.ppo, recipe.generate, recipe.train
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    episodes_per_iteration = ppo.rollout_batch_size * ppo.samples_per_prompt  # k responses to each prompt
    reward_fn = load_reward_fn(ppo.reward_fn) if ppo.reward_fn else None  # import problems before any model loads
    check_installed(generate.engine)

    # --- data: prompts (and gold-scored held-out prompts for the monitor) ---------------------------------------
    tokenizer = tokenizer_for(model_section, recipe.data.template)
    prompts, gold_prompts = load_prompts(recipe, tokenizer, folder)
    # responses end at any stop id (EOS, the chat template's end of turn); the prompts' format, for a reward model
    # that reads another one
    stop_ids, fmt = stop_token_ids(tokenizer, model_section.name_or_path), make_format(recipe.data.template, tokenizer)

    # --- the roles: actor (and critic) trained, reference and reward model frozen ------------------------------
    roles = load_roles(recipe, tokenizer, device)  # under LoRA the reference is the actor, adapter disabled
    startup_notes(accelerator, roles, prompts, generate, device)  # long prompts, memory per role
    iterations = iterations_of(len(prompts), ppo, train)
    models, optimizers, schedulers = prepare_training(accelerator, roles, ppo, train, iterations)
    actor, critic = models["actor"], models.get("critic")
    policy = accelerator.unwrap_model(actor)
    kl_ctl = KL_CONTROLLERS[ppo.kl_control](ppo.kl_coef, ppo.kl_budget, ppo.kl_horizon)
    monitor, guard = OverOptimizationMonitor(ppo.kl_budget), StepGuard(train)
    scaffold = Scaffold(accelerator, folder, train, iterations, "ppo", models, optimizers, schedulers,
                        {"kl_controller": kl_ctl, "monitor": monitor, "guard": guard}, unit="iteration")
    # the run's constants; log-probs under the distribution sampled from: its temperature (greedy PPO is refused
    # at load), no pad token
    ctx = RunContext.build(tokenizer, device, stop_ids, fmt, generate.temperature, train.micro_batch_size)
    engine = build_engine(policy, ctx, generate)  # from the resumed weights; `sync` after each update follows them
    if scaffold.step == 0:  # a fresh run: the statistics that normalize scores (and the critic on their scale)
        scaffold.state["reward_stats"] = reward_scale(accelerator, recipe, roles, critic, engine, prompts, tokenizer,
                                                      stop_ids, fmt)
    if roles.scorer is not None:
        roles.scorer.use_stats(scaffold.state["reward_stats"])
    gold = partial(gold_check, accelerator, engine, tokenizer, gold_prompts, generate, roles.scorer, recipe.seed,
                   monitor, stop_ids)
    if gold_prompts and scaffold.step == 0:
        scaffold.log(0, gold(0, 0.0))  # the starting policy: the baseline the monitor compares against
    temperature, suppress_ids = ctx.temperature, ctx.suppress_ids

    for it in scaffold.steps():
        watch = Stopwatch()

        def rollout(r: int, it: int = it, watch: Stopwatch = watch) -> Round:  # r > 0: dynamic sampling's extra rounds
            rows, keys = rollout_rows(len(prompts), ppo, it + r * iterations, rank, world, recipe.seed)  # k per prompt
            batch = [prompts[i] for i in rows]
            # 1. rollout: the actor samples (noise keyed by example, so any batching or process count samples alike)
            with watch("time/generate_s"):
                gen = sample(engine, batch, generate, row_keys(recipe.seed, it + r * iterations, keys, device),
                             synced=True)
            # 2. score prompt+response once: the frozen reward model and/or the reward function (+ DAPO's overlong
            # penalty)
            with watch("time/score_s"):
                raw_scores, sources = score_rollout(roles.scorer, reward_fn, ppo.reward_weights, gen, batch, tokenizer,
                                                    fmt)
                scores = shape_scores(raw_scores, gen.ended, ppo.missing_eos_penalty, ppo.reward_clip,
                                      overlong_scores(gen.response_mask, ppo, generate.max_new_tokens))
            return Round(batch, gen, raw_scores, sources, scores)

        # DAPO's dynamic sampling: groups whose k scores are all equal are replaced by those of more prompts
        rnd, sampling = dynamic_sample(accelerator, rollout, ppo.samples_per_prompt, ppo.max_sampling_rounds,
                                       tokenizer.pad_token_id) if ppo.dynamic_sampling else (rollout(0), {})
        gen, raw_scores, sources, scores = rnd.gen, rnd.raw_scores, rnd.sources, rnd.scores
        engine.idle()  # a GPU engine releases its memory for the passes and the update

        # 3. old logprobs (actor), reference logprobs, values (critic): no grad
        mask = gen.response_mask.float()
        with watch("time/ref_values_s"):
            old_logprobs, ref_logprobs, old_values, entropy = no_grad_passes(
                policy, critic and accelerator.unwrap_model(critic), roles.reference, gen.sequences,
                gen.attention_mask, gen.prompt_width, train.micro_batch_size, temperature, suppress_ids,
                accelerator.autocast, mask)

        # 4. rewards: -kl_coef * KL per token (kl_in: reward), the score at the last token; 5. advantages
        kl = per_token_kl(old_logprobs, ref_logprobs, ppo.kl_estimator) * mask
        rewards = kl_penalized_rewards(scores, kl, mask, kl_ctl.value if ppo.kl_in == "reward" else 0.0)
        advantages, returns = estimate_advantages(rewards, old_values, mask, ppo)
        if whitened(ppo):
            mean, var = global_whiten_stats(accelerator, advantages, mask)
            advantages = masked_whiten(advantages, mask, mean=mean, var=var)
        # the sampler's log-probs against the trainer's (vllm): logged, and with tis, each token's loss weighted
        mismatch = sampler_mismatch(accelerator, gen, old_logprobs, mask)
        if ppo.rollout_correction == "tis":
            weights, tis_stats = truncated_importance_weights(old_logprobs, gen.logprobs, mask,
                                                              ppo.rollout_correction_cap)
            advantages, mismatch = advantages * weights, {**mismatch, **{k: float(v) for k, v in tis_stats.items()}}
        exp = Experience(sequences=gen.sequences, attention_mask=gen.attention_mask, prompt_width=gen.prompt_width,
                         response_mask=mask, ended=gen.ended, raw_scores=raw_scores, scores=scores,
                         old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values, entropy=entropy,
                         kl=kl, rewards=rewards, advantages=advantages, returns=returns, sources=sources)

        # 6. K epochs x minibatches of clipped updates of the actor (and critic)
        with watch("time/update_s"):
            stats = update(accelerator, actor, critic, optimizers, schedulers, guard, exp, ppo, train, temperature,
                           suppress_ids, kl_ctl.value, it + 1, torch.Generator().manual_seed(recipe.seed * 7919 + it),
                           max_new_tokens=generate.max_new_tokens)
        with watch("time/sync_s"):
            engine.sync(policy)  # the next rollout samples from the updated weights

        # 7. metrics, KL controller, gold monitor
        metrics = {**rollout_metrics(accelerator, exp, kl_ctl.value, episodes_per_iteration,
                                     watch.seconds["time/generate_s"]), **stats, **sampling, **mismatch,
                   **watch.seconds}
        metrics.update({"train/lr": schedulers["actor"].get_last_lr()[0], "train/nonfinite_skipped": guard.skipped})
        kl_ctl.update(metrics["objective/kl"], episodes_per_iteration)
        if gold_prompts and ((it + 1) % ppo.gold_every == 0 or it + 1 == iterations):
            metrics.update(gold(it + 1, metrics["objective/kl"]))
        scaffold.log(it + 1, metrics, {"score": f"{metrics['objective/score']:.3f}",
                                       "kl": f"{metrics['objective/kl']:.3f}"})
    final = scaffold.close()
    engine.close()
    guard.check_trained()  # a run in which every update was skipped (non-finite) must not finish

    # --- artifacts: the actor (adapter on the sft model, or full) and the critic ------------------------------------
    extra = save_trained(accelerator, folder.partial, actor, critic, tokenizer, recipe)
    extra.update(kl_controller=kl_ctl.state_dict(), reward_stats=scaffold.state["reward_stats"])
    final["train/iterations"] = iterations
    return folder.finish(final, extra=extra, derived=derived(recipe) | engine_figures(accelerator))
