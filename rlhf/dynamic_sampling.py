"""DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2, eq. 11): a group of k responses to one prompt whose scores
are all equal has zero advantage on every token and teaches nothing; drop such groups and sample more prompts until
the batch is full.

Every process keeps its fixed share of rows (the update's minibatch partition and the DDP gradient average assume
it): each process fills its own share from its own extra rounds, and all processes run the same number of rounds
(generation is collective), until every process is full or `max_rounds` extra rounds have run. A share still short
after them is completed with the first dropped groups (counted), so the batch size never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.losses import informative_groups
from rlhf.rollout import Generation, concat
from rlhf.runtime import global_sum, global_sums


@dataclass
class Round:
    """One rollout round of this process: the prompts, their generation and scores (rows of a group contiguous)."""

    batch: list[dict]  # (B,) prompt records
    gen: Generation
    raw_scores: torch.Tensor  # (B,)
    sources: dict  # name -> (B,)
    scores: torch.Tensor  # (B,) shaped


def select_rows(rnd: Round, rows: list[int]) -> Round:
    g = rnd.gen
    gen = Generation(sequences=g.sequences[rows], attention_mask=g.attention_mask[rows],
                     response_mask=g.response_mask[rows], ended=g.ended[rows], prompt_width=g.prompt_width,
                     logprobs=None if g.logprobs is None else g.logprobs[rows])
    return Round([rnd.batch[i] for i in rows], gen, rnd.raw_scores[rows],
                 {k: v[rows] for k, v in rnd.sources.items()}, rnd.scores[rows])


def merge_rounds(rounds: list[Round], pad_id: int) -> Round:
    return Round([p for r in rounds for p in r.batch], concat([r.gen for r in rounds], pad_id),
                 torch.cat([r.raw_scores for r in rounds]),
                 {k: torch.cat([r.sources[k] for r in rounds]) for k in rounds[0].sources},
                 torch.cat([r.scores for r in rounds]))


def dynamic_sample(accelerator, sample_round: Callable[[int], Round], group_size: int, max_rounds: int,
                   pad_id: int) -> tuple[Round, dict[str, float]]:
    """Sample round 0 (the iteration's own prompts) and, while some process lacks informative groups, up to
    `max_rounds` extra rounds (`sample_round(r)`: this process's next prompts); keep this process's first
    informative groups up to its share. Returns the filled round and the metrics `rollout/dropped_groups` (groups
    dropped as uninformative, over all processes), `rollout/filled_groups` (dropped groups put back because the
    rounds ran out) and `rollout/sampling_rounds`."""
    first = sample_round(0)
    needed = first.scores.shape[0] // group_size
    kept: list[Round] = []
    dropped: list[Round] = []
    n_kept = n_dropped = 0
    rnd, r = first, 0
    while True:
        informative = informative_groups(rnd.scores, group_size).tolist()
        for g, good in enumerate(informative):
            part = select_rows(rnd, list(range(g * group_size, (g + 1) * group_size)))
            if good and n_kept < needed:
                kept.append(part)
                n_kept += 1
            elif not good:
                dropped.append(part)
                n_dropped += 1
        missing = float(global_sum(accelerator, float(needed - n_kept)))
        if missing == 0 or r >= max_rounds:
            break
        r += 1
        rnd = sample_round(r)
    filled = dropped[:needed - n_kept]
    out = merge_rounds(kept + filled, pad_id)
    sums = global_sums(accelerator, {"dropped": float(n_dropped), "filled": float(len(filled))})
    return out, {"rollout/dropped_groups": sums["dropped"], "rollout/filled_groups": sums["filled"],
                 "rollout/sampling_rounds": float(r + 1)}
