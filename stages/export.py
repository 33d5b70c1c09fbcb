"""`export` stage: merge adapters, check parity, write a model card, optionally push to the hub.

1. Load the source's adapter on its (recursively merged) parent, unmerged, in float32: the reference.
2. Merge (`merge_and_unload`) in float32 and compare logits and greedy generations with the reference.
3. Cast to the export dtype and compare logits again (dtype-appropriate tolerance).
4. Save safetensors shards, tokenizer, generation config (pad != eos, every stop id) and README.md (model card).
5. Only if everything above passed and the folder is in place: push with huggingface_hub.
A failed check stops the export (exit 2) before anything is written or pushed. A failed push leaves the
finished export; the same command with `resume=true` pushes it then.
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import partial
from pathlib import Path

import torch

from data_formats.chat import CHAT, make_format, user_message
from data_formats.schemas import PromptRecord
from rlhf.artifacts import RunFolder, check_parents, read_manifest
from rlhf.card import chat_usage, lineage, model_card
from rlhf.data import encode_prompts, fit_prompt, model_positions, read_prompts
from rlhf.errors import UserError
from rlhf.hub import push_run
from rlhf.models import DTYPES, STATS_FILE, hf_model, load_model, model_dir, model_info
from rlhf.tokenization import load_tokenizer, stop_token_ids
from rlhf.vllm_engine import exported_greedy_check
from rlhf.runtime import partial_state
from rlhf.saving import set_generation_ids, verify_model_dir
from rlhf.recipes import ExportRecipe

# max |logit difference| allowed, relative to max(1, max |logit|): merge in float32, then the cast
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
BUILTIN_PROMPTS = ["Give three tips for staying healthy.", "Reverse the list.\n\nc a f b",
                   "What is the capital of France?", "Write a haiku about autumn.", "Sort the list.\n\nd b a"]


def forward_figures(model, tokenizer, prompts: list[list[int]], new_tokens: int, causal: bool,
                    stop_ids: list[int]) -> list[dict]:
    """Per prompt: last-layer outputs (logits or scores) and greedy continuation token ids (up to a stop id).
    Prompts are cut from the left to leave room for the new tokens within the model's positions."""
    out = []
    positions = model_positions(model)
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([fit_prompt(ids, positions, new_tokens if causal else 0, tokenizer.bos_token_id)])
            logits = model(input_ids=x).logits.float()[0]
            greedy = []
            if causal:
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=stop_ids)
                greedy = gen[0, x.shape[1]:].tolist()
            out.append({"logits": logits, "greedy": greedy, "prompt": x[0].tolist()})
    return out


def compare(a: list[dict], b: list[dict], tol: float) -> dict:
    diffs = [float((x["logits"] - y["logits"]).abs().max()) for x, y in zip(a, b)]
    scale = max(1.0, max(float(x["logits"].abs().max()) for x in a))
    same = [x["greedy"] == y["greedy"] for x, y in zip(a, b)]
    return {"max_abs_logit_diff": max(diffs), "logit_scale": scale, "tolerance": tol * scale,
            "logits_ok": max(diffs) <= tol * scale, "greedy_match": sum(same) / len(same)}


def run(recipe: ExportRecipe) -> Path:
    state = partial_state()
    folder = RunFolder(recipe, state.is_main_process, state.wait_for_everyone)
    export = recipe.export
    if folder.finished:
        if export.push_to_hub and state.is_main_process:
            push_run(folder.final, export)  # a push that failed before is retried; a done one is not repeated
        return folder.final
    check_parents(recipe)
    model_dir(recipe.source, "source")  # a missing source is a one-line error
    info = model_info(recipe.source, "source")
    causal = info.get("task", "causal_lm") == "causal_lm"
    tokenizer = load_tokenizer(recipe.source, "source", trust_remote_code=export.trust_remote_code, pad_key="source")
    chain = lineage(recipe.source)
    folder.input("source", recipe.source)

    # --- parity prompts, in the format the model was trained with (its tokenizer's chat template) ---------
    template = CHAT if tokenizer.chat_template else "alpaca"
    if export.parity_prompts:
        records = read_prompts(export.parity_prompts, "export.parity_prompts", recipe.seed, template,
                               "export.parity_prompts", tokenizer=tokenizer)
    else:
        fmt = make_format(template, tokenizer, "source")
        records = [PromptRecord("built-in", fmt.prompt([user_message(p)], "built-in"), {}, fmt.special_tokens)
                   for p in BUILTIN_PROMPTS]
    prompts = [p["prompt_ids"] for p in encode_prompts(records, tokenizer, 256)[0]][: export.parity_count]
    stop_ids = stop_token_ids(tokenizer, recipe.source)
    figures = partial(forward_figures, tokenizer=tokenizer, prompts=prompts, new_tokens=export.parity_new_tokens,
                      causal=causal, stop_ids=stop_ids)

    # --- 1-3: unmerged reference, float32 merge, cast ------------------------------------------------------
    if info["kind"] == "adapter":
        from peft import PeftModel

        base = load_model(info["base"], "source", task=info.get("task", "causal_lm"), dtype="float32",
                          trust_remote_code=export.trust_remote_code, vocab=len(tokenizer))
        model = PeftModel.from_pretrained(base, model_dir(recipe.source, "source")[0]).eval()
        reference = figures(model)
        model = model.merge_and_unload()
        merge_check = compare(reference, figures(model), TOLERANCE["float32"])
    else:
        model = load_model(recipe.source, "source", task=info.get("task", "causal_lm"), dtype="float32",
                           trust_remote_code=export.trust_remote_code, vocab=len(tokenizer)).eval()
        reference = figures(model)
        merge_check = None
    model = model.to(DTYPES[export.dtype])
    exported = figures(model)
    cast_check = compare(reference, exported, TOLERANCE[export.dtype])
    parity = {"prompts": len(prompts), "merge_fp32": merge_check, "cast": cast_check}
    failed = [name for name, c in (("merge", merge_check), ("cast", cast_check)) if c and not c["logits_ok"]]
    if merge_check and merge_check["greedy_match"] < 1.0:
        failed.append("merge greedy generations")
    if failed:
        raise UserError(f"parity check failed ({', '.join(failed)}): {json.dumps(parity)}; nothing was exported",
                        None, "source")

    # --- 4: the standalone folder ------------------------------------------------------------------------
    out = folder.partial / "model"
    if state.is_main_process:
        hf = hf_model(model)
        hf.config.pad_token_id = tokenizer.pad_token_id
        hf.save_pretrained(str(out), safe_serialization=True, max_shard_size=export.max_shard_size)
        tokenizer.save_pretrained(str(out))
        if causal:
            set_generation_ids(hf.generation_config, tokenizer, stop_ids)
            hf.generation_config.save_pretrained(str(out))
        if causal:  # users serve exported models with vLLM: its greedy decode must equal transformers'
            parity["vllm"] = exported_greedy_check(out, exported, export.parity_new_tokens, stop_ids,
                                                     export.dtype)
            if parity["vllm"].get("greedy_match", 1.0) < 1.0:
                print(f"warning: vLLM's greedy decode of the exported model differs from transformers' on "
                      f"{1 - parity['vllm']['greedy_match']:.0%} of the parity prompts", file=sys.stderr)
        stats = Path(recipe.source) / STATS_FILE
        if stats.is_file():  # reward models keep their normalization next to the weights
            shutil.copy(stats, out / STATS_FILE)
        eval_results = _eval_results_for(recipe.source)
        (out / "README.md").write_text(model_card(chain, vars(export), parity, eval_results,
                                                  chat_usage(tokenizer, stop_ids) if causal else None))
        verify_model_dir(out, {"kind": "full"})  # shards present, non-empty, finite; config and tokenizer load
    final = folder.finish({"parity/cast_max_abs_logit_diff": cast_check["max_abs_logit_diff"]},
                          extra={"parity": parity, "model_info": {"kind": "full", "task": info.get("task")},
                                 "lineage": [{k: entry.get(k) for k in ("stage", "path", "recipe_sha256")}
                                             for entry in chain]})

    # --- 5: push (after the local export is complete and intact) ---------------------------------------
    if export.push_to_hub and state.is_main_process:
        push_run(final, export)
    return final


def _eval_results_for(source: str) -> list[dict] | None:
    """Eval figures of this model from a sibling eval run folder (the demo layout), if there is one."""
    src = str(Path(source).resolve())
    for candidate in Path(source).resolve().parent.glob("*/manifest.json"):
        try:
            manifest = read_manifest(candidate.parent)
        except UserError:  # a damaged neighbour is no reason to fail an export
            continue
        if manifest.get("stage") != "eval":
            continue
        models = manifest.get("recipe", {}).get("eval", {}).get("models", {})
        names = [n for n, p in models.items() if str(Path(p).resolve()) == src]
        if names:
            return [r for r in manifest.get("results", []) if r.get("model") in names]
    return None
