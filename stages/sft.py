"""`sft` stage: supervised fine-tuning on Alpaca-format instructions, with LoRA or in full.

Loss: next-token cross-entropy on response tokens only (unless `data.train_on_prompt`), averaged over
all trained tokens of the accumulated multi-process batch. `data.packing` packs the examples of a
micro-batch into a few rows of about twice the longest example (`rlhf.batching.balanced_rows`), position ids
restarting at each example.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from rlhf import loop
from rlhf.artifacts import RunFolder, check_parents
from rlhf.data import IGNORE_INDEX, prompt_ids
from rlhf.batching import collate_sft, to_device
from rlhf.forward import label_logprobs
from rlhf.losses import masked_sum
from rlhf.models import count_parameters, load_trainable
from rlhf.tokenization import stop_token_ids, tokenizer_for
from rlhf.saving import save_model
from rlhf.prepared import prepare_sft
from rlhf.optim import build_optimizer, build_scheduler
from rlhf.recipes import SFTRecipe, derived
from rlhf.rollout import complete, write_samples
from rlhf.runtime import engine_figures, engine_line, make_accelerator, seed_everything


def trained_tokens(example: dict) -> int:
    """Tokens whose prediction is trained (labels after the first position that are not ignored)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def run(recipe: SFTRecipe) -> Path:
    accelerator = make_accelerator(recipe)
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)
    check_parents(recipe)
    model_section, data, lora = recipe.model, recipe.data, recipe.lora

    # --- data --------------------------------------------------------------------------------------
    tokenizer = tokenizer_for(model_section, data.template)
    prepared = prepare_sft(data, tokenizer, recipe.seed)  # tokenized once, memory-mapped from the cache
    train, evals, folder.counts = prepared.train, prepared.eval, prepared.counts
    for name, path in (("model", model_section.name_or_path), ("data.train", data.train), ("data.eval", data.eval)):
        folder.input(name, path)

    # --- model -------------------------------------------------------------------------------------
    model = load_trainable(model_section, lora, tokenizer)
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        print(f"sft: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters trained "
              f"({'LoRA r=%d' % lora.r if lora else 'full'}), {len(train)} train / {len(evals)} eval examples; "
              f"{engine_line(accelerator)}")

    steps = loop.total_steps(len(train), recipe.train)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id, packing = tokenizer.pad_token_id, data.packing

    # --- loss: response-token NLL, summed, divided by the step's global count of trained tokens -----
    def make_loss(examples):
        def micro_loss(idx, den):
            batch = to_device(collate_sft([examples[i] for i in idx], pad_id, packing), accelerator.device)
            logprobs, mask, _ = label_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                               batch["position_ids"])
            nll = -masked_sum(logprobs, mask)
            return nll / den["tokens"], {"loss": nll.detach() / den["tokens"]}
        return micro_loss

    def save_best():
        save_model(accelerator, model, tokenizer, folder.partial / "best", base=model_section.name_or_path)

    task = loop.Task(
        n_train=len(train), lengths=prepared.lengths,
        weights=lambda idx: {"tokens": float(sum(trained_tokens(train[i]) for i in idx))},
        micro_loss=make_loss(train), n_eval=len(evals),
        eval_weights=lambda idx: {"tokens": float(sum(trained_tokens(evals[i]) for i in idx))},
        eval_loss=make_loss(evals),
        finalize=lambda s: {**s, "perplexity": math.exp(min(s["loss"], 50.0))} if "loss" in s else s,
        best_key="eval/loss" if recipe.train.eval_every else None, on_best=save_best)
    metrics = loop.run(accelerator, folder, recipe.train, recipe.seed, model, optimizer, scheduler, task, "sft")

    # --- artifact: adapter (or full model) + tokenizer, and a sample table --------------------------
    info = save_model(accelerator, model, tokenizer, folder.partial / "model", base=model_section.name_or_path)
    with folder.optional("the sample table (samples.md)"):  # never costs the trained model
        if recipe.samples:
            # every process decodes (under FSDP each forward gathers sharded weights collectively); one writes
            records = [SimpleNamespace(**r) for r in prepared.head[: recipe.samples]]
            rows = complete(accelerator.unwrap_model(model), tokenizer, prompt_ids(records, tokenizer),
                            recipe.generate, accelerator.device, synced=True,
                            stop_ids=stop_token_ids(tokenizer, model_section.name_or_path))
            if accelerator.is_main_process:
                write_samples(folder.partial / "samples.md", [{"prompt": r.prompt, **row}
                                                              for r, row in zip(records, rows)])
    return folder.finish(metrics, extra={"model_info": info, "parameters": total, "trainable_parameters": trainable},
                         derived=derived(recipe) | engine_figures(accelerator))
