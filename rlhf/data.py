"""Data for the stages: records -> token ids (`rlhf.batching` makes the batches).

`load_split` reads and validates records (data_formats), renders them in the recipe's format (a text
template, or the tokenizer's chat template), holds out an eval split, and counts what it skipped;
`read_corpus` reads pretraining text and `load_gold_prompts` the gold-scored prompts of the
over-optimization monitor. The `encode_*` functions tokenize prompt and responses (turn by turn in a
conversation) separately and join the ids, so the prompt/response boundary is exact and matches what the
model sees when it generates; rendered chat text is tokenized without adding special tokens again (the
template wrote them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data_formats.chat import Segment, make_format
from data_formats.readers import Invalid, parse_json, read_records
from data_formats.schemas import parse_preference, parse_prompt
from data_formats.tasks import has_gold
from rlhf.batching import IGNORE_INDEX, pad
from rlhf.errors import DataError, UserError, warn
from rlhf.sections import PromptData


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class Split:
    train: list
    eval: list
    counts: dict = field(default_factory=dict)
    format: object = None  # the TextFormat / ChatFormat the records were rendered with


KEYS = {"train": "data.train", "eval": "data.eval", "template": "data.template",
        "eval_fraction": "data.eval_fraction"}


def _parse_all(spec: str, split: str, parse: Callable, invalid: Invalid, key: str) -> list:
    out = []
    for raw in read_records(spec, split, invalid, key):
        try:
            out.append(parse(raw))
        except DataError as err:
            invalid(err)
    return out


def _no_records(invalid: Invalid, spec: str, key: str) -> DataError:
    first = f" (first problem: {invalid.first})" if invalid.first else ""
    return DataError("no valid records" + first, spec, key)


def load_split(section, parse: Callable, seed: int, keys: dict[str, str] | None = None, tokenizer=None) -> Split:
    """Read `data.train` (+ `data.eval` or an `eval_fraction` split) with `parse(raw, format) -> record`.

    `section.template` names the format: a text template, or 'chat' (rendered with `tokenizer`'s chat
    template, so the tokenizer is required then). Records need a `.prompt`; the held-out split is made by
    prompt, so no prompt is in both splits. `keys` renames the recipe keys errors name, for prompt files
    that are not a `data` section (e.g. {"train": "ppo.gold_prompts"}).
    """
    keys = {**KEYS, **(keys or {})}
    fmt = make_format(section.template, tokenizer, keys["template"])
    parse_t = lambda raw: parse(raw, fmt)  # noqa: E731
    invalid = Invalid(section.skip_invalid)
    train = _parse_all(section.train, section.split, parse_t, invalid, keys["train"])
    if not train:
        raise _no_records(invalid, section.train, keys["train"])
    if section.max_records:
        train = train[: section.max_records]
    skipped, first = invalid.count, invalid.first
    if section.eval:
        eval_split = section.eval_split or section.split
        if section.eval == section.train and eval_split == section.split:
            raise UserError(f"is the same data as {keys['train']}; give another file or set {keys['eval']}_split",
                            None, keys["eval"])
        invalid = Invalid(section.skip_invalid)  # its own count, so "first problem" is about this file
        evals = _parse_all(section.eval, eval_split, parse_t, invalid, keys["eval"])
        if not evals:
            raise _no_records(invalid, section.eval, keys["eval"])
        skipped, first = skipped + invalid.count, first or invalid.first
        seen = {r.prompt: r.where for r in train}
        dupes = [(r.where, seen[r.prompt]) for r in evals if r.prompt in seen]
        if dupes:
            raise DataError(f"{len(dupes)} eval prompt(s) also appear in the training data (e.g. {dupes[0][0]} "
                            f"and {dupes[0][1]}); held-out results would be inflated", section.eval, keys["eval"])
    elif section.eval_fraction > 0:
        prompts = sorted({r.prompt for r in train})
        random.Random(seed).shuffle(prompts)
        held = set(prompts[: max(1, int(len(prompts) * section.eval_fraction))])
        evals = [r for r in train if r.prompt in held]
        train = [r for r in train if r.prompt not in held]
        if not train:
            raise UserError(f"leaves no training records: the data holds {len(prompts)} distinct prompt(s) and "
                            f"at least one is held out; lower it or give more data", None, keys["eval_fraction"])
    else:
        evals = []
    counts = {"train_records": len(train), "eval_records": len(evals), "invalid_skipped": skipped}
    if skipped:
        counts["first_invalid"] = first
    return Split(train, evals, counts, fmt)


def read_corpus(paths: list[str], key: str = "data.train") -> list[str]:
    """Pretraining documents from .txt files (blank-line separated) and .jsonl files ('text' per line)."""
    docs = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"corpus file {path} not found", None, key)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = p.read_bytes()[:err.start].count(b"\n") + 1
            raise DataError("not valid UTF-8", f"{path}:{line}") from None
        if p.suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                obj = parse_json(line, f"{path}:{lineno}")
                if not isinstance(obj, dict):
                    raise DataError("expected a JSON object with a 'text' field", f"{path}:{lineno}")
                doc = obj.get("text")
                if not isinstance(doc, str):
                    raise DataError("missing or not a string", f"{path}:{lineno}", "text")
                docs.append(doc)
        else:
            docs += [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError("the corpus holds no documents", ", ".join(paths), key)
    return docs


def read_prompts(path: str, key: str, seed: int, template: str = "alpaca", template_key: str = "data.template",
                 max_records: int | None = None, tokenizer=None) -> list:
    """Prompt records of a file that is not a recipe's `data` section (eval prompts, export parity prompts,
    gold prompts), rendered for `tokenizer`'s model; errors name `key` (and `template_key`)."""
    section = PromptData(train=path, template=template, max_records=max_records)
    return load_split(section, parse_prompt, seed, {"train": key, "template": template_key}, tokenizer).train


def load_gold_prompts(path: str, template: str, tokenizer, max_prompt_len: int, count: int, seed: int,
                      key: str = "ppo.gold_prompts") -> list[dict]:
    """The first `count` prompts of `path` that carry a gold answer (the task suite's 'task' + 'answer'),
    encoded like rollout prompts; a file with none is an error (the monitor would measure nothing)."""
    records = read_prompts(path, key, seed, template, tokenizer=tokenizer)
    prompts = [p for p in encode_prompts(records, tokenizer, max_prompt_len)[0] if has_gold(p["meta"])]
    if not prompts:
        raise UserError("no record has a gold answer ('task' and 'answer' of the task suite)", path, key)
    return prompts[:count]


# ---------------------------------------------------------------------------------------------
# tokenization


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]  # truncation is ours


def prompt_ids(records: list, tokenizer) -> list[list[int]]:
    """Token ids of each record's prompt as the model sees it when it generates: with the tokenizer's
    special tokens (BOS) for a text template, without them when a chat template wrote them into the text."""
    out: list[list[int] | None] = [None] * len(records)
    for special in (True, False):
        rows = [i for i, r in enumerate(records) if r.special_tokens == special]
        for i, ids in zip(rows, _ids(tokenizer, [records[i].prompt for i in rows], special)):
            out[i] = ids
    return out


def _left_truncate(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """Keep the end of a prompt (where the question and the response header are); keep BOS."""
    if len(ids) <= limit:
        return ids
    if bos is not None and ids and ids[0] == bos and limit > 1:
        return [bos] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def _reply_ids(tokenizer, texts: list[str], eos: list[bool]) -> list[list[int]]:
    """Responses tokenized on their own, EOS appended where the format says (a chat template's reply
    already ends in its end-of-turn token)."""
    return [ids + [tokenizer.eos_token_id] * e for ids, e in zip(_ids(tokenizer, texts, False), eos)]


# --- prompts that generation feeds to a model: within its positions --------------------------------------


def model_positions(model) -> int | None:
    """Longest sequence a model's position embeddings cover (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_prompt(ids: list[int], positions: int | None, new_tokens: int, bos: int | None) -> list[int]:
    """Cut a prompt from the left (keeping BOS) so that it and `new_tokens` generated tokens fit in
    `positions`; a prompt is never cut below one token. Unchanged when `positions` is None."""
    if positions is None:
        return ids
    return _left_truncate(ids, max(1, positions - new_tokens), bos)


def fit_to_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_prompt` for a left-padded batch (B, P): rows too long for the model's positions are cut and
    the batch is re-padded; a batch that fits is returned as it is (no copy)."""
    positions = model_positions(model)
    if positions is None or input_ids.shape[1] + new_tokens <= positions:
        return input_ids, attention_mask
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    rows = [fit_prompt(row[mask.bool()].tolist(), positions, new_tokens, bos)
            for row, mask in zip(input_ids, attention_mask)]
    device = input_ids.device
    return (pad(rows, pad_id, left=True).to(device),
            pad([[1] * len(r) for r in rows], 0, left=True).to(attention_mask.dtype).to(device))


def warn_long_prompts(prompts: list[dict], model, new_tokens: int) -> None:
    """One warning with the count of prompts ({'prompt_ids'}) that generation will cut to fit the model."""
    positions = model_positions(model)
    if positions is None:
        return
    limit = max(1, positions - new_tokens)
    long = sum(len(p["prompt_ids"]) > limit for p in prompts)
    if long:
        warn(f"{long} of {len(prompts)} prompts are longer than the model's {positions} positions leave room for "
             f"({limit} tokens before {new_tokens} new ones); generation cuts them from the left")


def encode_sft(records: list, tokenizer, max_len: int, train_on_prompt: bool, key: str = "data.max_len",
               max_prompt_len: int | None = None):
    """SFT records -> {'input_ids', 'labels'}; labels are IGNORE_INDEX outside the responses.

    The ids are the prompt's, then each turn's in order (a multi-turn conversation trains every assistant
    turn; the text between them is not trained). With `max_prompt_len`, a longer prompt is first
    left-truncated to it (BOS and the end of the prompt, next to the response, are kept). Then the rest
    is cut at its end to fit `max_len`. An example whose (cut) prompt alone fills `max_len` would lose its
    whole response: it is dropped and counted in `dropped_too_long`. `truncated` counts kept examples
    that lost prompt or response tokens.
    """
    out, dropped, truncated = sft_rows(records, tokenizer, max_len, train_on_prompt, max_prompt_len)
    check_sft_kept(records, len(out), max_len, key)
    return out, {"dropped_too_long": dropped, "truncated": truncated}


def sft_rows(records: list, tokenizer, max_len: int, train_on_prompt: bool, max_prompt_len: int | None):
    """`encode_sft` without its all-dropped check (a chunk of a large set may drop all): (examples, dropped,
    truncated)."""
    bos = tokenizer.bos_token_id
    prompts = prompt_ids(records, tokenizer)
    turns = [[Segment(r.response, True)] + list(r.rest) for r in records]
    flat = _reply_ids(tokenizer, [t.text for ts in turns for t in ts],
                      [t.trained and r.eos for r, ts in zip(records, turns) for t in ts])
    out, dropped, truncated, at = [], 0, 0, 0
    for p, ts in zip(prompts, turns):
        body, body_labels = [], []
        for turn, ids in zip(ts, flat[at:at + len(ts)]):
            body += ids
            body_labels += ids if turn.trained or train_on_prompt else [IGNORE_INDEX] * len(ids)
        at += len(ts)
        p2 = _left_truncate(p, max_prompt_len, bos) if max_prompt_len else p
        room = max_len - len(p2)
        if room <= 0:
            dropped += 1
            continue
        truncated += len(p2) < len(p) or len(body) > room
        labels = (p2 if train_on_prompt else [IGNORE_INDEX] * len(p2)) + body_labels[:room]
        out.append({"input_ids": p2 + body[:room], "labels": list(labels)})
    return out, dropped, truncated


def encode_preferences(records: list, tokenizer, max_len: int, max_prompt_len: int, key: str = "data.max_len"):
    """Pairs -> {'prompt_ids', 'chosen_ids', 'rejected_ids', 'margin'}; responses end in EOS (or in the
    chat template's end-of-turn token).

    Prompts are left-truncated to `max_prompt_len`; responses are cut to fit `max_len`. Pairs left with
    an empty response, or with chosen == rejected after cutting, are dropped and counted.
    """
    out, dropped, truncated = preference_rows(records, tokenizer, max_len, max_prompt_len)
    check_pairs_kept(records, len(out), max_len, key)
    return out, {"dropped_too_long": dropped, "truncated": truncated}


def preference_rows(records: list, tokenizer, max_len: int, max_prompt_len: int):
    """`encode_preferences` without its all-dropped check: (pairs, dropped, truncated)."""
    bos = tokenizer.bos_token_id
    prompts = prompt_ids(records, tokenizer)
    eos = [r.eos for r in records]
    chosen = _reply_ids(tokenizer, [r.chosen for r in records], eos)
    rejected = _reply_ids(tokenizer, [r.rejected for r in records], eos)
    out, dropped, truncated = [], 0, 0
    for rec, p, c, j in zip(records, prompts, chosen, rejected):
        p2 = _left_truncate(p, max_prompt_len, bos)
        room = max_len - len(p2)
        c2, j2 = c[:room], j[:room]
        truncated += (len(p2) < len(p)) or len(c2) < len(c) or len(j2) < len(j)
        if room <= 0 or not c2 or not j2 or c2 == j2:
            dropped += 1
            continue
        out.append({"prompt_ids": p2, "chosen_ids": c2, "rejected_ids": j2,
                    "margin": rec.margin if rec.margin is not None else 0.0})
    return out, dropped, truncated


def load_pairs(section, tokenizer, seed: int) -> tuple[list, list, dict]:
    """The preference pairs of a recipe's `data` section (rm, dpo), encoded: (train, eval, manifest counts)."""
    split = load_split(section, lambda raw, fmt: parse_preference(raw, fmt, section.format), seed,
                       tokenizer=tokenizer)
    train, train_counts = encode_preferences(split.train, tokenizer, section.max_len, section.max_prompt_len)
    evals = encode_preferences(split.eval, tokenizer, section.max_len, section.max_prompt_len)[0] if split.eval else []
    counts = {**split.counts, **train_counts,
              "tokens": length_stats([len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in train])}
    return train, evals, counts


def encode_prompts(records: list, tokenizer, max_prompt_len: int) -> tuple[list, dict]:
    """Prompt records -> {'prompt_ids', 'meta', 'prompt', 'record'} (left-truncated); 'record' is the
    PromptRecord, whose raw record a reward model reading another format renders in its own."""
    bos = tokenizer.bos_token_id
    out, truncated = [], 0
    for rec, p in zip(records, prompt_ids(records, tokenizer)):
        p2 = _left_truncate(p, max_prompt_len, bos)
        truncated += len(p2) < len(p)
        out.append({"prompt_ids": p2, "meta": rec.meta, "prompt": rec.prompt, "record": rec})
    return out, {"truncated": truncated}


def check_sft_kept(records: list, kept: int, max_len: int, key: str = "data.max_len") -> None:
    """An error when SFT records were given and every one was dropped."""
    _check_kept(records, kept, max_len, key, "the prompt alone fills the budget",
                "set " + key.rsplit(".", 1)[0] + ".max_prompt_len, ")


def check_pairs_kept(records: list, kept: int, max_len: int, key: str = "data.max_len") -> None:
    """An error when pairs were given and every one was dropped."""
    _check_kept(records, kept, max_len, key, "no response token, or none that tells chosen from rejected, is left",
                "lower max_prompt_len, ")


def _check_kept(records: list, kept: int, max_len: int, key: str, why: str, also: str) -> None:
    if records and not kept:
        raise UserError(f"all {len(records)} records are too long for {max_len} tokens after truncation "
                        f"({why}); raise it, {also}or shorten the prompts", None, key)


def length_stats(lengths) -> dict:
    """min, quantiles, max and mean of a list (or numpy array) of lengths."""
    if len(lengths) == 0:
        return {}
    s = np.sort(np.asarray(lengths, dtype=np.int64))
    pick = lambda q: int(s[min(len(s) - 1, int(q * len(s)))])  # noqa: E731
    return {"min": int(s[0]), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": int(s[-1]),
            "mean": round(int(s.sum()) / len(s), 1)}
