"""`rm` stage: a pairwise (Bradley-Terry) reward model.

Reward model = causal-LM backbone + a scalar head read at the last non-pad token of prompt+response.
Loss (`rlhf.losses.pairwise_loss`): -log sigmoid(r_chosen - r_rejected - margin), optionally plus
center_coef * (r_chosen + r_rejected)^2; chosen and rejected go through one concatenated forward.
After training, the scores of the held-out completions fit a mean/std that PPO uses to normalize.
The saved model is a plain `AutoModelForSequenceClassification` folder (LoRA merged into it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf import loop
from rlhf.artifacts import RunFolder, check_parents
from rlhf.files import write_json_atomic
from rlhf.checkpoint import SHARDED
from rlhf.batching import collate_pairs, eval_shard, to_device
from rlhf.errors import UserError
from rlhf.losses import pairwise_loss
from rlhf.models import STATS_FILE, ScalarHead, count_parameters, load_trainable
from rlhf.tokenization import tokenizer_for
from rlhf.saving import save_model
from rlhf.prepared import prepare_pairs
from rlhf.optim import build_optimizer, build_scheduler
from rlhf.recipes import RMRecipe, derived
from rlhf.runtime import engine_figures, engine_line, forwards_to_match, global_sums, make_accelerator, seed_everything
from rlhf.scoring import rewards_at_last_token


def run(recipe: RMRecipe) -> Path:
    accelerator = make_accelerator(recipe)
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    check_parents(recipe)
    model_section, data = recipe.model, recipe.data

    # --- data --------------------------------------------------------------------------------------
    tokenizer = tokenizer_for(model_section, data.template)
    prepared = prepare_pairs(data, tokenizer, recipe.seed)  # tokenized once, memory-mapped from the cache
    train, evals, folder.counts = prepared.train, prepared.eval, prepared.counts
    for name, path in (("model", model_section.name_or_path), ("data.train", data.train), ("data.eval", data.eval)):
        folder.input(name, path)

    # --- model: backbone + zero-initialized scalar head (always trained) ------------------------------
    model = ScalarHead(load_trainable(model_section, recipe.lora, tokenizer, task="seq_cls"))
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        print(f"rm: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trained, "
              f"{len(train)} train / {len(evals)} eval pairs; {engine_line(accelerator)}")

    steps = loop.total_steps(len(train), recipe.train)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id, packing = tokenizer.pad_token_id, data.packing

    # --- loss: Bradley-Terry over the step's pairs (chosen rows then rejected rows, one forward) -------
    def make_loss(pairs):
        def micro_loss(idx, den):
            batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id, packing), accelerator.device)
            rewards = pair_rewards(model, batch)  # (2B,)
            chosen, rejected = rewards.chunk(2)
            margin = batch["margin"] if any(pairs[i]["margin"] for i in idx) else None
            loss, stats = pairwise_loss(chosen, rejected, margin, recipe.rm.center_coef)
            share = len(idx) / den["pairs"]  # this micro-batch's share of the step's mean
            stats = {k: v.detach() * share for k, v in stats.items() if k != "rewards/std"}
            stats["rewards/sq"] = (chosen.detach() ** 2 + rejected.detach() ** 2).mean() / 2 * share
            return loss * share, stats
        return micro_loss

    def finalize(s: dict) -> dict:
        s = dict(s)
        if "rewards/sq" in s:
            s["rewards/std"] = math.sqrt(max(s.pop("rewards/sq") - s.get("rewards/mean", 0.0) ** 2, 0.0))
        return s

    task = loop.Task(
        n_train=len(train), lengths=prepared.lengths,
        weights=lambda idx: {"pairs": float(len(idx))}, micro_loss=make_loss(train), n_eval=len(evals),
        eval_weights=lambda idx: {"pairs": float(len(idx))}, eval_loss=make_loss(evals), finalize=finalize,
        progress=("loss/pairwise", "rewards/accuracy"))
    metrics = loop.run(accelerator, folder, recipe.train, recipe.seed, model, optimizer, scheduler, task, "rm")

    # --- reward normalization: mean/std of scores on held-out (or training) completions -------------
    pairs = evals if (recipe.rm.norm_split == "eval" and evals) else train
    stats = fit_reward_stats(accelerator, model, pairs, pad_id, recipe.train.micro_batch_size, packing)
    stats["fitted_on"] = "eval" if pairs is evals else "train"
    metrics.update({"reward/mean": stats["mean"], "reward/std": stats["std"]})

    # --- artifact: a plain sequence-classification model (LoRA merged into it) ----------------------------
    to_save = model
    if recipe.lora is not None:
        if accelerator.distributed_type in SHARDED:
            raise UserError("merging a LoRA reward model needs unsharded weights: train it with lora: null under "
                            "FSDP/DeepSpeed, or with DDP", None, "lora")
        # merge in float32 on the CPU, then cast back: in bf16 the small LoRA update would be rounded away
        backbone = accelerator.unwrap_model(model).model
        dtype = backbone.dtype
        to_save = ScalarHead(backbone.to("cpu", torch.float32).merge_and_unload().to(dtype))
    info = save_model(accelerator, to_save, tokenizer, folder.partial / "model")
    if accelerator.is_main_process:
        write_json_atomic(folder.partial / STATS_FILE, stats)
        write_json_atomic(folder.partial / "model" / STATS_FILE, stats)
    return folder.finish(metrics, extra={"model_info": info, "reward_stats": stats, "parameters": total,
                                         "trainable_parameters": trainable},
                         derived=derived(recipe) | engine_figures(accelerator))


def pair_rewards(model, batch: dict) -> torch.Tensor:
    """(2B,) the head at each sequence's last token, chosen then rejected, from padded or packed rows
    (`collate_pairs`)."""
    if batch["position_ids"] is None:
        return rewards_at_last_token(model, batch["input_ids"], batch["attention_mask"])
    return model(batch["input_ids"], None, batch["position_ids"]).flatten()[batch["last"]]


def fit_reward_stats(accelerator, model, pairs: list[dict], pad_id: int, micro: int, packing: bool = False) -> dict:
    """Mean and std of the scores of chosen and rejected completions (all processes together)."""
    model.eval()
    s = {"n": 0.0, "sum": 0.0, "sq": 0.0}
    with torch.no_grad(), accelerator.autocast():
        shard = eval_shard(len(pairs), accelerator.process_index, accelerator.num_processes, micro)
        for idx in shard:
            batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id, packing), accelerator.device)
            r = pair_rewards(model, batch).float()
            s["n"] += r.numel()
            s["sum"] += float(r.sum())
            s["sq"] += float((r ** 2).sum())
        for _ in range(forwards_to_match(accelerator, len(pairs), micro, len(shard))):
            pair_rewards(model, batch)  # a shorter shard joins the others' collective forwards (FSDP, ZeRO-3)
    s = global_sums(accelerator, s)
    mean = s["sum"] / max(s["n"], 1.0)
    std = math.sqrt(max(s["sq"] / max(s["n"], 1.0) - mean ** 2, 1e-12))
    return {"mean": mean, "std": max(std, 1e-6), "count": int(s["n"])}

