"""Model cards and lineage: what a model was made from, by which stages, with which results."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.artifacts import read_manifest

KEY_METRICS = ("eval/loss", "eval/perplexity", "train/loss", "eval/loss/pairwise", "eval/rewards/accuracy",
               "eval/rewards/margin", "objective/score", "objective/kl", "gold/accuracy", "rewards/accuracy",
               "eval/loss/dpo", "train/loss/dpo", "train/rewards/accuracy")


def lineage(spec: str) -> list[dict]:
    """Run manifests from `spec` back to the first non-run model (newest first).

    Each entry: {'path', 'stage', 'recipe_sha256', 'metrics' (key ones), 'inputs', 'recipe', 'model_info'}.
    The last entry may be {'path': <hub id or folder>, 'stage': None} for a base model from outside.
    """
    chain, seen = [], set()
    current: str | None = spec
    while current and current not in seen:
        seen.add(current)
        manifest = read_manifest(current) if Path(current).is_dir() else None
        if manifest is None:
            chain.append({"path": current, "stage": None})
            break
        metrics = manifest.get("metrics", {})
        chain.append({"path": str(Path(current).resolve()), "stage": manifest["stage"],
                      "recipe_sha256": manifest.get("recipe_sha256"), "recipe": manifest.get("recipe", {}),
                      "metrics": {k: metrics[k] for k in KEY_METRICS if metrics.get(k) is not None},
                      "inputs": manifest.get("inputs", {}), "model_info": manifest.get("model_info", {})})
        model_input = manifest.get("inputs", {}).get("model")
        current = (model_input or {}).get("path") or (model_input or {}).get("hub_id")
    return chain


def inference_template(chain: list[dict]) -> str | None:
    """The prompt template the instruction-tuned ancestor was trained with."""
    from data_formats.templates import load_template

    for entry in chain:
        if entry.get("stage") in ("sft", "dpo", "ppo") and entry.get("recipe", {}).get("data", {}).get("template"):
            try:
                return load_template(entry["recipe"]["data"]["template"]).prompt_no_input
            except Exception:  # a template file that moved since: the card just omits it
                return None
    return None


def chat_usage(tokenizer, stop_ids: list[int]) -> dict | None:
    """How to prompt a causal model, for its card: a one-turn prompt as the tokenizer's chat template renders it
    (the format the model was trained with, see `data_formats.chat.install_chat_template`) and its stop tokens;
    None without a chat template."""
    if not tokenizer.chat_template:
        return None
    example = tokenizer.apply_chat_template([{"role": "user", "content": "<instruction>"}], tokenize=False,
                                            add_generation_prompt=True)
    return {"example": example, "stop_tokens": tokenizer.convert_ids_to_tokens(list(stop_ids))}


def model_card(chain: list[dict], export: dict, parity: dict, eval_results: list[dict] | None,
               usage: dict | None = None) -> str:
    """The README.md of an exported model; `usage`: `chat_usage` of its tokenizer (causal models)."""
    base = chain[-1]
    base_name = base["path"] if base.get("stage") is None else f"{base['path']} (trained from scratch by `pretrain`)"
    datasets = sorted({v.get("path") or v.get("hub_id") for e in chain for k, v in e.get("inputs", {}).items()
                       if k.startswith(("data", "corpus"))})
    lora = next((e["recipe"].get("lora") for e in chain if e.get("recipe", {}).get("lora")), None)
    front = ["---", "library_name: transformers", "tags: [rlhf, " + ", ".join(
        sorted({e["stage"] for e in chain if e.get("stage")})) + "]"]
    if base.get("stage") is None and "/" in str(base["path"]) and not Path(base["path"]).exists():
        front.append(f"base_model: {base['path']}")
    front.append("---")
    lines = front + ["", f"# {export.get('hub_repo_id') or Path(chain[0]['path']).name}", "",
                     f"Exported by `rlhf export` from `{chain[0]['path']}` "
                     f"({export['dtype']}, adapters merged, safetensors).", "",
                     "## Base model", "", f"- {base_name}", "", "## Lineage", "",
                     "| stage | run | recipe sha256 | key metrics |", "| --- | --- | --- | --- |"]
    for e in chain:
        if not e.get("stage"):
            continue
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in e["metrics"].items()) or "—"
        lines.append(f"| {e['stage']} | `{e['path']}` | `{(e['recipe_sha256'] or '')[:12]}` | {metrics} |")
    lines += ["", "## Training data", ""] + [f"- `{d}`" for d in datasets or ["(none recorded)"]]
    if lora:
        lines += ["", "## LoRA", "", "```json", json.dumps(lora, indent=2), "```"]
    if eval_results:
        lines += ["", "## Evaluation", "", markdown_table(eval_results)]
    lines += ["", "## Export parity check", "", "```json", json.dumps(parity, indent=2), "```"]
    template = inference_template(chain)
    if template:
        lines += ["", "## Prompt template", "", "Use the template the model was fine-tuned with:", "", "```",
                  template + "<response>", "```"]
    elif usage:  # data.template: chat (or a base model's own template)
        lines += ["", "## Prompt format", "", "The tokenizer's chat template renders the conversations the model was "
                  "trained with: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`. One user "
                  "turn:", "", "```", usage["example"] + "<response>", "```"]
    if usage:
        stops = ", ".join(f"`{t}`" for t in usage["stop_tokens"])
        lines += ["", f"Generation stops at any of {stops} (`generation_config.eos_token_id`)."]
    lines += ["", "## Intended use", "", export["intended_use"], ""]
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    def f(v, pct=False):
        if v is None:
            return "—"
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    lines = ["| model | gold acc. (sampled) | gold acc. (greedy) | RM score | KL to ref | length | EOS rate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['model']} | {f(r['gold_accuracy'], True)} | {f(r['gold_accuracy_greedy'], True)} | "
                     f"{f(r['reward_score'])} | {f(r['kl_to_reference'])} | {f(r['response_length'])} | "
                     f"{f(r['eos_rate'], True)} |")
    return "\n".join(lines)


def win_rate_table(comparisons: list[dict]) -> str:
    """Judged win rates against the baseline (`stages.eval.compare_with_baseline`), gold accuracy beside."""
    lines = ["| model | vs | win | win 95% CI | tie | loss | length (chars) | baseline length | gold acc. | "
             "baseline gold acc. |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        ci = c.get("win_ci") or [None, None]
        lines.append(f"| {c['model']} | {c['baseline']} | {percent(c['win'])} | {percent(ci[0])}–{percent(ci[1])} | "
                     f"{percent(c['tie'])} | {percent(c['loss'])} | {c['length_chars']:.1f} | "
                     f"{c['baseline_length_chars']:.1f} | {percent(c.get('gold_accuracy'))} | "
                     f"{percent(c.get('baseline_gold_accuracy'))} |")
    return "\n".join(lines)


def percent(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"
