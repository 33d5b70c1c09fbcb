"""`rlhf check RECIPE [key=value ...]`: pre-flight for any stage's recipe, in seconds.

Validates the recipe and every data record (first error with file:line), loads the tokenizer, checks
pad != eos, that EOS ends the trained labels, that the reward head reads the last non-pad token, and
prints two rendered examples showing which tokens are trained, the token-length distribution and how
many records truncation drops. Exit 0 when ready, 2 when not (the CLI prints the error line).
"""

from __future__ import annotations

import sys

from data_formats.schemas import parse_alpaca, parse_preference, parse_prompt
from rlhf.artifacts import expect_run
from rlhf.data import (IGNORE_INDEX, collate_pairs, encode_preferences, encode_prompts, encode_sft, length_stats,
                       load_split)
from rlhf.models import last_token_index, load_tokenizer, model_dir
from rlhf.recipes import load_recipe


class Style:
    """Trained tokens highlighted (ANSI on a terminal, [[...]] markers otherwise)."""

    def __init__(self, tty: bool):
        self.tty = tty

    def trained(self, text: str) -> str:
        return f"\033[1;32m{text}\033[0m" if self.tty else f"[[{text}]]"

    def ignored(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.tty else text


def render(tokenizer, ids: list[int], trained: list[bool], style: Style) -> str:
    """Decode token by token; consecutive trained tokens form one highlighted span."""
    out, span, span_trained = [], [], None
    for tok, flag in zip(ids, trained):
        if span and flag != span_trained:
            text = tokenizer.decode(span)
            out.append(style.trained(text) if span_trained else style.ignored(text))
            span = []
        span.append(tok)
        span_trained = flag
    if span:
        text = tokenizer.decode(span)
        out.append(style.trained(text) if span_trained else style.ignored(text))
    return "".join(out)


def _report(title: str, counts: dict, lengths: list[int]) -> None:
    print(f"{title}: {counts.get('train_records', 0)} train / {counts.get('eval_records', 0)} eval records, "
          f"{counts.get('invalid_skipped', 0)} invalid skipped, {counts.get('dropped_too_long', 0)} dropped as too "
          f"long, {counts.get('truncated', 0)} truncated")
    print(f"tokens per example: {length_stats(lengths)}")


def check_sft(recipe, tokenizer, style: Style) -> None:
    split = load_split(recipe.data, parse_alpaca, recipe.seed)
    examples, counts = encode_sft(split.train, tokenizer, recipe.data.max_len, recipe.data.train_on_prompt)
    _report("sft data", {**split.counts, **counts}, [len(e["input_ids"]) for e in examples])
    no_eos = sum(1 for e in examples if e["labels"][-1] != tokenizer.eos_token_id)
    if no_eos == len(examples):
        raise_error("no example ends its trained labels with EOS: the model would never learn to stop",
                    "data.max_len")
    print(f"EOS ends the labels of {len(examples) - no_eos} of {len(examples)} examples (the rest were cut)")
    for e in examples[:2]:
        print("---")
        print(render(tokenizer, e["input_ids"], [lab != IGNORE_INDEX for lab in e["labels"]], style))


def check_pairs(recipe, tokenizer, style: Style, reward_head: bool) -> None:
    d = recipe.data
    split = load_split(d, lambda raw, t: parse_preference(raw, t, d.format), recipe.seed)
    pairs, counts = encode_preferences(split.train, tokenizer, d.max_len, d.max_prompt_len)
    _report("preference data", {**split.counts, **counts},
            [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs])
    batch = collate_pairs(pairs[:2], tokenizer.pad_token_id)
    last = last_token_index(batch["attention_mask"])
    shown = len(pairs[:2])
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        print("--- chosen" if row < shown else "--- rejected")
        print(render(tokenizer, ids, [lab != IGNORE_INDEX for lab in batch["labels"][row][:len(ids)].tolist()],
                     style))
        read = int(batch["input_ids"][row, last[row]])
        if reward_head and read != tokenizer.eos_token_id:
            raise_error(f"the reward head would read {tokenizer.decode([read])!r}, not the final EOS", "data")
    if reward_head:
        print(f"reward head reads the last non-pad token of every row: {tokenizer.eos_token!r} (checked on a "
              f"padded batch of {batch['input_ids'].shape[0]} rows)")


def check_prompts(recipe, tokenizer) -> None:
    split = load_split(recipe.data, parse_prompt, recipe.seed)
    prompts, counts = encode_prompts(split.train, tokenizer, recipe.data.max_prompt_len)
    _report("prompts", {**split.counts, **counts}, [len(p["prompt_ids"]) for p in prompts])
    print("---")
    print(prompts[0]["prompt"])


def raise_error(message: str, key: str):
    from rlhf.errors import UserError

    raise UserError(message, None, key)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhf check RECIPE.yaml [dotted.key=value ...]")
        return 0 if argv else 2
    recipe = load_recipe(argv[0], None, argv[1:])
    style = Style(sys.stdout.isatty())
    stage = recipe.stage
    print(f"recipe {argv[0]}: stage {stage}, valid")
    if stage in ("sft", "rm", "dpo", "ppo"):
        m = recipe.model
        expect_run(m.name_or_path, {"pretrain", "sft", "dpo", "ppo", "export"}, "model.name_or_path")
        model_dir(m.name_or_path, "model.name_or_path")
        tokenizer = load_tokenizer(m.name_or_path, pad_token=m.pad_token, revision=m.revision,
                                   trust_remote_code=m.trust_remote_code)
        print(f"tokenizer: {len(tokenizer)} tokens, pad {tokenizer.pad_token!r} ({tokenizer.pad_token_id}) != eos "
              f"{tokenizer.eos_token!r} ({tokenizer.eos_token_id})")
        if stage == "sft":
            check_sft(recipe, tokenizer, style)
        elif stage in ("rm", "dpo"):
            check_pairs(recipe, tokenizer, style, reward_head=stage == "rm")
        else:
            expect_run(recipe.ppo.reward_model, {"rm"}, "ppo.reward_model")
            model_dir(recipe.ppo.reward_model, "ppo.reward_model")
            check_prompts(recipe, tokenizer)
    elif stage == "eval":
        for name, spec in recipe.eval.models.items():
            model_dir(spec, f"eval.models.{name}")
        print(f"models: {', '.join(recipe.eval.models)}")
    elif stage == "export":
        model_dir(recipe.source, "source")
    print("ready")
    return 0
