"""Prepared data of the sft, rm and dpo stages: read, validated, rendered and tokenized once into the on-disk
cache (`rlhf.datacache`), then memory-mapped.

Preparation reuses `rlhf.data` as it is (`load_split` for records, the eval split and skip counts;
`sft_rows` / `preference_rows` for the token ids), so the examples, their order and every count are what the
in-memory path gives. Tokenization runs in chunks of `CHUNK` records, in `data.num_proc` worker processes
when it is above 1 (chunks are written in order, so the result is identical to one process); only a chunk's
ids are ever Python lists. The stages get `Prepared`: Arrow-backed splits (`split[i]` is one example as a
dict), the lengths that batch plans sort by as a numpy array, and the manifest counts.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass, field

import numpy as np

from data_formats.chat import make_format
from data_formats.schemas import PromptRecord, parse_alpaca, parse_preference, parse_prompt
from rlhf.data import (check_pairs_kept, check_sft_kept, encode_prompts, length_stats, load_split, preference_rows,
                       sft_rows)
from rlhf.datacache import describe, load_or_build, source_fingerprint, tokenizer_fingerprint

# The version of each stage's encoder: bump it when a change to the code changes the ids it writes.
ENCODERS = {"sft": 1, "pairs": 1, "prompts": 1}
CHUNK = 1000  # records tokenized per task
HEAD = 256  # prompts kept for a stage's sample table (`samples` beyond this get this many)


@dataclass
class Prepared:
    train: object  # datasets.Dataset (memory-mapped); train[i] -> one example
    eval: object  # the same, or [] when there is no eval split
    lengths: np.ndarray | None  # (N,) the length each training example is batched by
    counts: dict  # the manifest's `data` counts
    head: list = field(default_factory=list)  # [{'prompt', 'special_tokens'}] of the first records (sample table)


def _parts(section, tokenizer, seed: int, stage: str, template_key: str = "data.template", **limits) -> dict:
    """Everything that changes the prepared examples."""
    fmt = make_format(section.template, tokenizer, template_key)
    held_out = section.eval is None and section.eval_fraction > 0
    return {"encoder": [stage, ENCODERS[stage]], "tokenizer": tokenizer_fingerprint(tokenizer),
            "format": list(fmt.signature),
            "train": source_fingerprint(section.train, section.split),
            "eval": source_fingerprint(section.eval, section.eval_split or section.split),
            "eval_fraction": section.eval_fraction, "seed": seed if held_out else None,
            "skip_invalid": section.skip_invalid, "max_records": section.max_records, **limits}


# --- chunks, in this process or in workers ----------------------------------------------------------------

_TOKENIZER = None


def _init(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def worker_tokenizer():
    """The tokenizer of the preparation this process works for (in `chunked`'s work functions)."""
    return _TOKENIZER


def chunked(work, records: list, tokenizer, num_proc: int, opts: dict):
    """`work((records, opts))` over chunks of `records`, results in order."""
    tasks = ((records[i:i + CHUNK], opts) for i in range(0, len(records), CHUNK))
    if num_proc <= 1 or len(records) <= CHUNK:
        _init(tokenizer)
        yield from map(work, tasks)
        return
    # fork: the workers inherit the tokenizer and the imported modules (spawn would import torch again)
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=_init, initargs=(tokenizer,)) as pool:
        yield from pool.imap(work, tasks)


def int_lists(rows: list) -> object:
    import pyarrow as pa

    return pa.array(rows, type=pa.list_(pa.int32()))


def _sft_chunk(task):
    import pyarrow as pa

    records, opts = task
    out, dropped, truncated = sft_rows(records, _TOKENIZER, **opts)
    lengths = [len(e["input_ids"]) for e in out]
    batch = pa.record_batch({"input_ids": int_lists([e["input_ids"] for e in out]),
                             "labels": int_lists([e["labels"] for e in out]),
                             "length": pa.array(lengths, type=pa.int32())})
    return batch, dropped, truncated, lengths


def _pair_chunk(task):
    import pyarrow as pa

    records, opts = task
    out, dropped, truncated = preference_rows(records, _TOKENIZER, **opts)
    batch = pa.record_batch({
        "prompt_ids": int_lists([e["prompt_ids"] for e in out]),
        "chosen_ids": int_lists([e["chosen_ids"] for e in out]),
        "rejected_ids": int_lists([e["rejected_ids"] for e in out]),
        "margin": pa.array([e["margin"] for e in out], type=pa.float64()),
        "length": pa.array([len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in out],
                           type=pa.int32())})
    return batch, dropped, truncated, [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in out]


def _write_split(writer, name: str, work, records: list, tokenizer, num_proc: int, opts: dict):
    """Tokenize `records` into table `name`: (dropped, truncated, stats lengths, kept)."""
    dropped = truncated = kept = 0
    stats: list[np.ndarray] = []
    for batch, d, t, lengths in chunked(work, records, tokenizer, num_proc, opts):
        writer.write(name, batch)
        dropped, truncated, kept = dropped + d, truncated + t, kept + batch.num_rows
        stats.append(np.asarray(lengths, dtype=np.int32))
    return dropped, truncated, (np.concatenate(stats) if stats else np.zeros(0, np.int32)), kept


def finish(tables: dict, meta: dict) -> Prepared:
    info = meta["info"]
    train = tables["train"]
    lengths = train.data.column("length").to_numpy() if "length" in train.column_names else None
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"data: {describe(meta)}")
    return Prepared(train, tables.get("eval", []), lengths, info["counts"], info.get("head", []))


# --- stages ----------------------------------------------------------------------------------------------


def prepare_sft(section, tokenizer, seed: int) -> Prepared:
    """The sft stage's examples ({'input_ids', 'labels'}), from the cache or prepared into it."""
    opts = dict(max_len=section.max_len, train_on_prompt=section.train_on_prompt,
                max_prompt_len=section.max_prompt_len)

    def build(writer) -> dict:
        split = load_split(section, parse_alpaca, seed, tokenizer=tokenizer)
        d, t, stats, kept = _write_split(writer, "train", _sft_chunk, split.train, tokenizer, section.num_proc, opts)
        check_sft_kept(split.train, kept, section.max_len)
        counts = {**split.counts, "dropped_too_long": d, "truncated": t, "eval_dropped_too_long": 0}
        if split.eval:
            ed, _, _, ekept = _write_split(writer, "eval", _sft_chunk, split.eval, tokenizer, section.num_proc, opts)
            check_sft_kept(split.eval, ekept, section.max_len)
            counts["eval_dropped_too_long"] = ed
        counts["tokens"] = length_stats(stats)
        head = [{"prompt": r.prompt, "special_tokens": r.special_tokens} for r in (split.eval or split.train)[:HEAD]]
        return {"counts": counts, "head": head}

    tables, meta = load_or_build(section.cache_dir, "sft", _parts(section, tokenizer, seed, "sft", **opts), build)
    return finish(tables, meta)


def prepare_pairs(section, tokenizer, seed: int) -> Prepared:
    """The preference pairs of rm and dpo ({'prompt_ids', 'chosen_ids', 'rejected_ids', 'margin'})."""
    opts = dict(max_len=section.max_len, max_prompt_len=section.max_prompt_len)

    def build(writer) -> dict:
        split = load_split(section, lambda raw, fmt: parse_preference(raw, fmt, section.format), seed,
                           tokenizer=tokenizer)
        d, t, stats, kept = _write_split(writer, "train", _pair_chunk, split.train, tokenizer, section.num_proc, opts)
        check_pairs_kept(split.train, kept, section.max_len)
        if split.eval:
            _, _, _, ekept = _write_split(writer, "eval", _pair_chunk, split.eval, tokenizer, section.num_proc, opts)
            check_pairs_kept(split.eval, ekept, section.max_len)
        return {"counts": {**split.counts, "dropped_too_long": d, "truncated": t, "tokens": length_stats(stats)}}

    parts = _parts(section, tokenizer, seed, "pairs", format_kind=section.format, **opts)
    tables, meta = load_or_build(section.cache_dir, "pairs", parts, build)
    return finish(tables, meta)


# --- prompts (ppo rollouts, eval) --------------------------------------------------------------------------


class PromptRows:
    """Encoded prompts, memory-mapped: `rows[i]` is what `encode_prompts` gives for record i ({'prompt_ids',
    'meta', 'prompt', 'record'}), built when it is asked for."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self.table[int(i)]
        meta = json.loads(r["meta"])
        record = PromptRecord(r["where"], r["prompt"], meta, r["special_tokens"], json.loads(r["messages"]),
                              json.loads(r["record"]))
        return {"prompt_ids": r["prompt_ids"], "meta": meta, "prompt": r["prompt"], "record": record}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def metas(self) -> list[dict]:
        return [json.loads(m) for m in self.table["meta"]]

    def prompt_lengths(self) -> np.ndarray:
        return self.table.data.column("length").to_numpy()


def _prompt_chunk(task):
    import pyarrow as pa

    records, opts = task
    out, counts = encode_prompts(records, _TOKENIZER, **opts)
    text = lambda obj: json.dumps(obj, default=str)  # noqa: E731  parquet values JSON does not know: as text
    batch = pa.record_batch({
        "prompt_ids": int_lists([e["prompt_ids"] for e in out]), "prompt": pa.array([r.prompt for r in records]),
        "where": pa.array([r.where for r in records]), "special_tokens": pa.array([r.special_tokens for r in records]),
        "meta": pa.array([text(r.meta) for r in records]), "messages": pa.array([text(r.messages) for r in records]),
        "record": pa.array([text(r.record) for r in records]),
        "length": pa.array([len(e["prompt_ids"]) for e in out], type=pa.int32())})
    return batch, 0, counts["truncated"], []


def prepare_prompts(section, tokenizer, seed: int, keys: dict | None = None) -> tuple[PromptRows, dict]:
    """The prompts of a ppo recipe's `data` section (or of `eval.prompts`, with `keys` naming its recipe keys),
    encoded: (rows, manifest counts)."""
    opts = dict(max_prompt_len=section.max_prompt_len)

    def build(writer) -> dict:
        split = load_split(section, parse_prompt, seed, keys, tokenizer)
        _, truncated, _, _ = _write_split(writer, "train", _prompt_chunk, split.train, tokenizer, section.num_proc,
                                          opts)
        return {"counts": {**split.counts, "truncated": truncated}}

    parts = _parts(section, tokenizer, seed, "prompts", (keys or {}).get("template", "data.template"), **opts)
    tables, meta = load_or_build(section.cache_dir, "prompts", parts, build)
    return PromptRows(finish(tables, meta).train), meta["info"]["counts"]
