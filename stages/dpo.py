"""`dpo` stage: Direct Preference Optimization (Rafailov et al. 2023), IPO (Azar et al. 2023), and the
reference-free SimPO (Meng et al. 2024) and ORPO (Hong et al. 2024): `dpo.loss_type`, a registered loss
(`rlhf.preference_losses`). A reference-free loss loads no reference and computes no reference log-probs.

Policy = the starting model + LoRA; reference = the same weights with the adapter disabled (no second
copy), or a frozen copy in full fine-tuning. With `dpdpo.precompute_ref` the reference logps of every
pair are computed once before training and stored in the run folder (reused on resume), so training
holds one model. Chosen and rejected rows go through one concatenated forward; logps are summed over
response tokens (averaged per token for `ipo`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf import loop
from rlhf.artifacts import RunFolder, check_parents
from rlhf.batching import collate_pairs, eval_shard, to_device
from rlhf.forward import label_logprobs, label_segments
from rlhf.losses import dpo_loss, masked_sum, segment_sums, sequence_logps
from rlhf.models import count_parameters, disable_dropout, load_frozen, load_trainable, reference_model
from rlhf.tokenization import tokenizer_for
from rlhf.saving import save_model
from rlhf.prepared import prepare_pairs
from rlhf.optim import build_optimizer, build_scheduler
from rlhf.recipes import DPORecipe, derived
from rlhf.registry import PREFERENCE_LOSSES
from rlhf.runtime import engine_figures, engine_line, forwards_to_match, make_accelerator, seed_everything

REF_FILE = "ref_logps.safetensors"


def pair_logps(model, batch: dict, average: bool):
    """Summed (or per-token averaged) response logps of the chosen and rejected sequences, (B,) each, and the
    sum of the chosen responses' token logps (for the optional SFT term). One forward over the batch's rows,
    padded (one sequence per row) or packed (`collate_pairs(packing=True)`, summed by sequence)."""
    logprobs, mask, _ = label_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                       batch["position_ids"])
    if batch.get("segments") is None:
        half = logprobs.shape[0] // 2
        chosen, rejected = sequence_logps(logprobs, mask, average=average).chunk(2)
        return chosen, rejected, masked_sum(logprobs[:half].float(), mask[:half])
    n = batch["margin"].shape[0] * 2
    segments = label_segments(batch["labels"], batch["segments"], mask)
    sums = segment_sums(logprobs, segments, n)  # (2B,)
    seq = sums / segment_sums(mask, segments, n).clamp(min=1) if average else sums
    chosen, rejected = seq.chunk(2)
    return chosen, rejected, sums[:n // 2].float().sum()


def run(recipe: DPORecipe) -> Path:
    accelerator = make_accelerator(recipe)
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    check_parents(recipe)
    model_section, data, dpo = recipe.model, recipe.data, recipe.dpo
    entry = PREFERENCE_LOSSES[dpo.loss_type]
    average = entry.length_normalized  # IPO, SimPO, ORPO: per-token mean logps

    # --- data --------------------------------------------------------------------------------------
    tokenizer = tokenizer_for(model_section, data.template)
    prepared = prepare_pairs(data, tokenizer, recipe.seed)  # tokenized once, memory-mapped from the cache
    train, evals, folder.counts = prepared.train, prepared.eval, prepared.counts
    for name, path in (("model", model_section.name_or_path), ("data.train", data.train), ("data.eval", data.eval),
                       ("dpo.reference", dpo.reference)):
        folder.input(name, path)

    # --- models: policy (+LoRA) and reference (adapter disabled, or a frozen copy) -------------------
    model = load_trainable(model_section, recipe.lora, tokenizer)
    reference = None  # None: the policy with its adapter disabled is the reference
    if not entry.reference_free and (recipe.lora is None or dpo.reference is not None):
        reference = load_frozen(model_section, tokenizer, accelerator.device, spec=dpo.reference,
                                key="dpo.reference" if dpo.reference else "model.name_or_path")
    if dpo.disable_dropout:  # the reference runs without dropout (eval mode): the policy must match it
        disable_dropout(model)
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        print(f"dpo: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trained, {len(train)} train pairs; "
              f"{engine_line(accelerator)}")

    steps = loop.total_steps(len(train), recipe.train)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id, packing = tokenizer.pad_token_id, data.packing

    def ref_pass(batch):
        """Reference logps: the frozen copy, or the policy with its adapter switched off."""
        with reference_model(accelerator.unwrap_model(model), reference) as ref:
            c, r, _ = pair_logps(ref, batch, average)
        return c.float(), r.float()

    # --- optional: reference logps of every pair, once, kept in the run folder -----------------------
    ref_cache: dict[str, torch.Tensor] = {}
    precompute_s = 0.0
    if dpo.precompute_ref and not entry.reference_free:
        started = time.perf_counter()
        ref_cache = precompute_reference(accelerator, folder.partial / REF_FILE, {"train": train, "eval": evals},
                                         pad_id, recipe.train.micro_batch_size, ref_pass, packing)
        reference = None  # training now holds only the policy
        precompute_s = time.perf_counter() - started

    # --- loss ----------------------------------------------------------------------------------------
    def make_loss(pairs, name):
        def micro_loss(idx, den):
            batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id, packing), accelerator.device)
            pc, pr, chosen_sum = pair_logps(model, batch, average)
            if entry.reference_free:
                rc = rr = None
            elif ref_cache:
                rows = torch.tensor(idx)
                rc = ref_cache[f"{name}_chosen"][rows].to(pc.device)
                rr = ref_cache[f"{name}_rejected"][rows].to(pc.device)
            else:
                rc, rr = ref_pass(batch)
            loss, stats = dpo_loss(pc.float(), pr.float(), rc, rr, dpo.beta, dpo.loss_type, dpo.label_smoothing,
                                   dpo.simpo_gamma)
            share = len(idx) / den["pairs"]
            loss = loss * share
            stats = {k: v.detach() * share for k, v in stats.items()}
            if dpo.sft_coef or entry.nll_weight:  # ORPO's NLL term, and/or an SFT term on chosen responses
                nll = -chosen_sum / den["chosen_tokens"]
                loss = loss + (dpo.sft_coef + entry.nll_weight) * nll
                stats["loss/sft"] = nll.detach()
            stats["loss/total"] = loss.detach()
            return loss, stats
        return micro_loss

    def weights(pairs):
        return lambda idx: {"pairs": float(len(idx)), "chosen_tokens": float(sum(len(pairs[i]["chosen_ids"])
                                                                                  for i in idx))}

    task = loop.Task(
        n_train=len(train), lengths=prepared.lengths,
        weights=weights(train), micro_loss=make_loss(train, "train"), n_eval=len(evals),
        eval_weights=weights(evals), eval_loss=make_loss(evals, "eval"),
        progress=("loss/dpo", "rewards/accuracy", "rewards/margin"))
    metrics = loop.run(accelerator, folder, recipe.train, recipe.seed, model, optimizer, scheduler, task, "dpo")
    metrics["time/precompute_ref_s"] = precompute_s

    info = save_model(accelerator, model, tokenizer, folder.partial / "model", base=model_section.name_or_path)
    return folder.finish(metrics, extra={"model_info": info, "parameters": total, "trainable_parameters": trainable},
                         derived=derived(recipe) | engine_figures(accelerator))


def precompute_reference(accelerator, path: Path, splits: dict[str, list], pad_id: int, micro: int,
                         ref_pass, packing: bool = False) -> dict[str, torch.Tensor]:
    """Reference logps of every pair of every split, stored as safetensors (reused when present)."""
    expected = {f"{name}_{side}": len(pairs) for name, pairs in splits.items() for side in ("chosen", "rejected")}
    if path.is_file():
        cached = load_file(str(path))
        if {k: v.shape[0] for k, v in cached.items()} == {k: n for k, n in expected.items() if n}:
            return cached
    out: dict[str, torch.Tensor] = {}
    for name, pairs in splits.items():
        if not pairs:
            continue
        chosen = torch.zeros(len(pairs), dtype=torch.float32)
        rejected = torch.zeros(len(pairs), dtype=torch.float32)
        shard = eval_shard(len(pairs), accelerator.process_index, accelerator.num_processes, micro)
        for idx in shard:
            batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id, packing), accelerator.device)
            with accelerator.autocast():
                c, r = ref_pass(batch)
            chosen[idx], rejected[idx] = c.cpu(), r.cpu()
        for _ in range(forwards_to_match(accelerator, len(pairs), micro, len(shard))):
            with accelerator.autocast():  # a shorter shard joins the others' collective forwards (FSDP, ZeRO-3)
                ref_pass(batch)
        if accelerator.num_processes > 1:  # each process filled its shard; the others are zero
            chosen = accelerator.reduce(chosen.to(accelerator.device), "sum").cpu()
            rejected = accelerator.reduce(rejected.to(accelerator.device), "sum").cpu()
        out[f"{name}_chosen"], out[f"{name}_rejected"] = chosen, rejected
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        save_file(out, str(tmp))
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return out
