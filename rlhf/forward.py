"""Model forwards that return per-token log-probabilities of given targets.

Logits are computed only at the positions whose next token is scored (`logits_to_keep`), so prompt
positions never reach the (large) vocabulary projection.
"""

from __future__ import annotations

import torch

from rlhf.data import IGNORE_INDEX
from rlhf.losses import logprobs_and_entropy
from rlhf.models import position_ids_from_mask


def label_logprobs(model, input_ids, labels, attention_mask=None, position_ids=None, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probabilities of the labelled tokens (labels != IGNORE_INDEX) under `model`.

    input_ids, labels: (B, T). Returns `(logprobs, mask, entropy)`, each (B, K), where K are the
    columns t whose next token t+1 is labelled in some row; `mask` is 1 where row b scores that token.
    `entropy` is None unless asked for.
    """
    predict = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    cols = predict.any(0).nonzero().squeeze(-1)  # (K,)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=cols, use_cache=False)
    logits = out.logits  # (B, K, V)
    targets = labels[:, 1:].index_select(1, cols).clamp(min=0)  # (B, K)
    mask = predict.index_select(1, cols).to(logits.dtype if logits.is_floating_point() else torch.float32)
    logprobs, entropy = logprobs_and_entropy(logits, targets, temperature, with_entropy=with_entropy)
    return logprobs, mask.float(), entropy


def response_logprobs(model, sequences, attention_mask, prompt_width: int, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True):
    """Log-probabilities of the response part of left-padded prompt + right-padded response rows.

    sequences, attention_mask: (B, P + A) with the prompt in the first P columns. Returns logprobs
    (B, A) (and entropy (B, A) when asked); position ids start at 0 on each row's first real token.
    `entropy_grad=False` computes the entropy for statistics only: nothing is then kept for its backward
    pass (PPO with entropy_coef 0).
    """
    width = sequences.shape[1]
    cols = torch.arange(prompt_width - 1, width - 1, device=sequences.device)  # predictors of the A tokens
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=cols, use_cache=False)
    logits = out.logits  # (B, A, V)
    return logprobs_and_entropy(logits, sequences[:, prompt_width:], temperature, with_entropy=with_entropy,
                                entropy_grad=entropy_grad)
