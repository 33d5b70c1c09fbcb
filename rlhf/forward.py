"""Model forwards that return per-token log-probabilities of given targets.

Logits are computed only at the positions whose next token is scored (`logits_to_keep`), so prompt
positions never reach the (large) vocabulary projection.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.data import IGNORE_INDEX
from rlhf.logprobs import logprobs_and_entropy
from rlhf.models import position_ids_from_mask


def label_logprobs(model, input_ids, labels, attention_mask=None, position_ids=None, temperature: float = 1.0,
                   with_entropy: bool = False, suppress_ids: Sequence[int] | None = None):
    """Log-probabilities of the labelled tokens (labels != IGNORE_INDEX) under `model`.

    input_ids, labels: (B, T). Returns `(logprobs, mask, entropy)`, each (B, K), where K are the
    columns t whose next token t+1 is labelled in some row; `mask` is 1 where row b scores that token,
    and logprobs are 0 where it is 0. `entropy` is None unless asked for. Log-probs and entropy are
    taken under `prepare_logits(logits, temperature, suppress_ids)`, the distribution a rollout samples from.
    """
    predict = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    cols = scored_columns(labels)  # (K,)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=cols, use_cache=False)
    logits = out.logits  # (B, K, V)
    targets = labels[:, 1:].index_select(1, cols).clamp(min=0)  # (B, K)
    scored = predict.index_select(1, cols)  # (B, K)
    logprobs, entropy = logprobs_and_entropy(logits, targets, temperature, suppress_ids, with_entropy=with_entropy)
    return logprobs.masked_fill(~scored, 0.0), scored.float(), entropy


def scored_columns(labels) -> torch.Tensor:
    """(K,) the columns t whose next token t+1 is labelled in some row: those `label_logprobs` scores."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def label_segments(labels, segments, mask) -> torch.Tensor:
    """For packed rows: the sequence (`segments` of the batch, (B, T)) of each label `label_logprobs` scored,
    −1 where `mask` (its (B, K) output) is 0. (B, K) long, for `rlhf.losses.segment_sums`."""
    seg = segments[:, 1:].index_select(1, scored_columns(labels))  # position t scores token t+1
    return seg.masked_fill(mask == 0, -1)


def response_logprobs(model, sequences, attention_mask, prompt_width: int, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True, suppress_ids: Sequence[int] | None = None):
    """Log-probabilities of the response part of left-padded prompt + right-padded response rows.

    sequences, attention_mask: (B, P + A) with the prompt in the first P columns. Returns logprobs
    (B, A), 0 where the response is padding (and entropy (B, A) when asked); position ids start at 0 on
    each row's first real token. Both are taken under `prepare_logits(logits, temperature, suppress_ids)`,
    the distribution a rollout samples from. `entropy_grad=False` computes the entropy for statistics
    only: nothing is then kept for its backward pass (PPO with entropy_coef 0).
    """
    width = sequences.shape[1]
    cols = torch.arange(prompt_width - 1, width - 1, device=sequences.device)  # predictors of the A tokens
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=cols, use_cache=False)
    logits = out.logits  # (B, A, V)
    logprobs, entropy = logprobs_and_entropy(logits, sequences[:, prompt_width:], temperature, suppress_ids,
                                             with_entropy=with_entropy, entropy_grad=entropy_grad)
    # padding after EOS is the pad token: −inf when the pad id is suppressed, so 0 keeps masked sums finite
    return logprobs.masked_fill(attention_mask[:, prompt_width:] == 0, 0.0), entropy
