"""Pretraining rows, tokenized and packed once into the on-disk cache (`rlhf.datacache`), then memory-mapped.

The rows: <s> doc </s> <s> doc </s> ... (documents in the order given) cut into rows of `max_len` tokens,
the tail dropped. Documents are tokenized in chunks (in `data.num_proc` workers when above
1, results in order) and packed as they come, carrying a partial row over to the next chunk, so no more than
a chunk's ids are ever Python lists and the rows are identical whatever the chunking.
"""

from __future__ import annotations

from rlhf.data import length_stats
from rlhf.datacache import load_or_build, source_fingerprint, tokenizer_fingerprint
from rlhf.prepared import chunked, finish, int_lists

ENCODER = 1  # bump when a change to the code changes the rows it writes
SAMPLE = 2000  # documents whose token counts the manifest reports


def _doc_chunk(task):
    docs, _ = task
    from rlhf import prepared

    tokenizer = prepared.worker_tokenizer()
    return tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]  # long documents are cut below


def _pack(writer, name: str, docs: list[str], tokenizer, max_len: int, num_proc: int) -> int:
    import pyarrow as pa

    carry: list[int] = []
    rows = 0
    for ids in chunked(_doc_chunk, docs, tokenizer, num_proc, {}):
        stream = carry + [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
        full = len(stream) // max_len * max_len
        writer.write(name, pa.record_batch({"input_ids": int_lists([stream[i:i + max_len]
                                                                    for i in range(0, full, max_len)])}))
        carry, rows = stream[full:], rows + full // max_len
    return rows


def prepare_corpus(section, tokenizer, train_docs: list[str], eval_docs: list[str], seed: int):
    """(train rows, eval rows or [], counts) of a pretrain recipe's `data`; `train_docs` / `eval_docs` are the
    documents after the seeded shuffle and the held-out split."""
    parts = {"encoder": ["corpus", ENCODER], "tokenizer": tokenizer_fingerprint(tokenizer),
             "corpus": [source_fingerprint(p) for p in section.train], "seed": seed,
             "eval_fraction": section.eval_fraction, "max_len": section.max_len}

    def build(writer) -> dict:
        counts = {"train_rows": _pack(writer, "train", train_docs, tokenizer, section.max_len, section.num_proc)}
        counts["eval_rows"] = _pack(writer, "eval", eval_docs, tokenizer, section.max_len, section.num_proc) \
            if eval_docs else 0
        sample = tokenizer(train_docs[:SAMPLE], verbose=False)["input_ids"]
        return {"counts": {**counts, "doc_tokens": length_stats([len(t) for t in sample])}}

    tables, meta = load_or_build(section.cache_dir, "corpus", parts, build)
    prepared = finish(tables, meta)
    return prepared.train, prepared.eval, meta["info"]["counts"]
