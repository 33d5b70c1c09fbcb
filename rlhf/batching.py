"""Batches: which examples each process takes at each step, and how a micro-batch becomes tensors.

`plan_batches` / `eval_shard` deal example indices to processes (no duplicates, no drops inside a step);
`collate_sft`, `collate_pairs` and `collate_prompts` pad (or pack, padding-free, position ids restarting
at each sequence) encoded examples (`rlhf.data`) into model inputs.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100  # labels with this value are not trained on (torch cross-entropy's ignore_index)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; the remainder (< batch_size, a different one each epoch) waits."""
    return n // batch_size


def plan_batches(n: int, batch_size: int, micro: int, rank: int, world: int, seed: int, epoch: int, step: int,
                 lengths: list[int] | None = None) -> list[list[int]]:
    """Example indices of this process's micro-batches for optimizer step `step` of `epoch`.

    The epoch order is a permutation seeded by (seed, epoch), so a resumed run sees the same data. The
    global batch is sorted by length (less padding) and dealt out micro-batch by micro-batch to the
    processes in turn: every example of the step is seen by exactly one process.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    batch = order[step * batch_size:(step + 1) * batch_size]
    if lengths is not None:
        batch.sort(key=lambda i: lengths[i])
    micros = [batch[i:i + micro] for i in range(0, len(batch), micro)]
    return micros[rank::world]


def eval_shard(n: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's share of an eval set, in micro-batches (every index exactly once overall)."""
    mine = list(range(rank, n, world))
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of sequences of `lengths` packed into rows of `width` tokens, first-fit decreasing (each length
    ≤ width). Rows no wider than the longest sequence keep attention's cost per row what padding pays (SDPA
    computes a packed row's block-diagonal mask in full), with less padding."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def balanced_rows(lengths: list[int]) -> list[list[int]]:
    """Indices of sequences of `lengths` split into rows of about twice the longest sequence's tokens, longest
    first onto the row with the fewest tokens (LPT), so that rows end up nearly equally long: little padding,
    and SDPA, which computes a packed row's block-diagonal mask in full, pays for rows of ~2x the longest
    sequence instead of one row of the whole batch."""
    count = max(1, math.ceil(sum(lengths) / (2 * max(lengths))))
    rows: list[list[int]] = [[] for _ in range(count)]
    filled = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = filled.index(min(filled))
        rows[r].append(i)
        filled[r] += lengths[i]
    return [row for row in rows if row]


def collate_sft(examples: list[dict], pad_id: int, packing: bool) -> dict:
    """Right-padded batch, or with `packing` padding-free rows (`balanced_rows`; the end of a shorter row is
    padding) whose position ids restart at each example (transformers turns restarting position ids into a
    block-diagonal causal mask)."""
    if packing:
        rows = balanced_rows([len(e["input_ids"]) for e in examples])
        ids, labels, pos = [], [], []
        for members in rows:
            row = [examples[i] for i in members]
            ids.append([t for e in row for t in e["input_ids"]])
            # the first token of an example is not predicted from the previous one
            labels.append([t for e in row for t in [IGNORE_INDEX] + list(e["labels"][1:])])
            pos.append([p for e in row for p in range(len(e["input_ids"]))])
        width = max(len(r) for r in ids)
        for r in range(len(ids)):  # padding continues the row's last positions: nothing reads it
            fill = width - len(ids[r])
            ids[r] += [pad_id] * fill
            labels[r] += [IGNORE_INDEX] * fill
            pos[r] += list(range(pos[r][-1] + 1, pos[r][-1] + 1 + fill))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
                "attention_mask": None}
    input_ids = pad([e["input_ids"] for e in examples], pad_id)
    labels = pad([e["labels"] for e in examples], IGNORE_INDEX)
    attention_mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": None}


def collate_pairs(examples: list[dict], pad_id: int, packing: bool = False) -> dict:
    """Chosen rows then rejected rows, for one concatenated forward: `input_ids`, `attention_mask`, `labels`
    (the response token ids, whose logprobs DPO sums; IGNORE_INDEX on prompt and pad positions) and `margin`
    (B,). Sequence i < B is pair i's chosen, B + i its rejected.

    Right-padded to the longest sequence, one per row; or with `packing`, padding-free: the 2B sequences are
    packed into as few rows of that width as first-fit decreasing finds, position ids restarting at each
    sequence (transformers keeps packed sequences from attending to each other) and `attention_mask` None.
    Packed batches add `segments` (R, W): the sequence each position belongs to (-1 on padding), and `last`
    (2B,): each sequence's last position in the flattened (R·W) batch, where a reward head reads its score.
    """
    seqs, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(e["prompt_ids"] + e[side])
            labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[side])
    margin = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    if not packing:
        return {"input_ids": pad(seqs, pad_id), "labels": pad(labels, IGNORE_INDEX),
                "attention_mask": pad([[1] * len(s) for s in seqs], 0), "position_ids": None, "margin": margin}
    width = max(len(s) for s in seqs)
    ids, lab, pos, seg, last = [], [], [], [], [0] * len(seqs)
    for r, members in enumerate(pack_rows([len(s) for s in seqs], width)):
        row_ids, row_lab, row_pos, row_seg = [], [], [], []
        for i in members:
            last[i] = r * width + len(row_ids) + len(seqs[i]) - 1
            row_ids += seqs[i]
            row_lab += [IGNORE_INDEX] + labels[i][1:]  # a sequence's first token is never predicted
            row_pos += list(range(len(seqs[i])))
            row_seg += [i] * len(seqs[i])
        fill = width - len(row_ids)  # trailing padding continues the last sequence's positions: nothing reads it
        row_pos += list(range(row_pos[-1] + 1, row_pos[-1] + 1 + fill))
        ids.append(row_ids + [pad_id] * fill)
        lab.append(row_lab + [IGNORE_INDEX] * fill)
        pos.append(row_pos)
        seg.append(row_seg + [-1] * fill)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(lab), "attention_mask": None,
            "position_ids": torch.tensor(pos), "margin": margin, "segments": torch.tensor(seg),
            "last": torch.tensor(last)}


def collate_prompts(examples: list[dict], pad_id: int) -> dict:
    """Left-padded prompts (generation appends on the right)."""
    return {"input_ids": pad([e["prompt_ids"] for e in examples], pad_id, left=True),
            "attention_mask": pad([[1] * len(e["prompt_ids"]) for e in examples], 0, left=True)}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
