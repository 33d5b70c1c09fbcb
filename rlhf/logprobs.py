"""Log-probabilities and entropy of (…, V) logits: one preparation for sampling and training, in row chunks.

One preparation of the logits for sampling and for training (`prepare_logits`): the rollout engine draws
from softmax(prepare_logits(logits)), so the update must score its tokens under the same distribution, or
every rollout is slightly off-policy. The (N, V) log-softmax is never materialized: rows are taken in chunks
of at most CHUNK_ELEMENTS values, each chunk is upcast and reduced, and the backward pass recomputes the
chunk's softmax from the saved per-row log-normalizer. Pure functions of tensors, as in `rlhf.losses`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


# values per chunk: 16M float32 = 64 MiB per chunk buffer (two are live at a time); 110 rows at V = 152k
CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 logits; float64 stays float64 (gradcheck)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def prepare_logits(logits: Tensor, temperature: float = 1.0, suppress_ids: Sequence[int] | None = None) -> Tensor:
    """z = logits / temperature, with z_i = −inf for every i in `suppress_ids`. (…, V) -> (…, V) float32.

    A new tensor (float64 stays float64); the input is not edited. `suppress_ids` are host ints (e.g.
    [pad_id]): each is filled through a plain index, so no id tensor is copied to the device (no sync).
    """
    z = logits.to(_compute_dtype(logits), copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    for i in suppress_ids or ():
        z[..., i] = float("-inf")
    return z


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    """Per row n of (N, V) logits, with z = prepare_logits(x_n), lse = log Σ_j exp z_j, p = softmax(z):

        logprob_n = z_y − lse                       ∂/∂z_j = δ_jy − p_j
        entropy_n = lse − Σ_j p_j z_j = −Σ p log p  ∂/∂z_j = −p_j (log p_j + H)

    and ∂/∂x_j = ∂/∂z_j / temperature (0 at suppressed ids, whose z_j is the constant −inf). The
    forward keeps only lse (and H when the entropy has a gradient): (N,) each; the backward rebuilds
    log p chunk by chunk from lse.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, suppress_ids, rows, with_entropy, entropy_grad):
        n = logits.shape[0]
        dtype = _compute_dtype(logits)
        logprobs = logits.new_empty(n, dtype=dtype)
        lse = logits.new_empty(n, dtype=dtype)
        entropy = logits.new_empty(n, dtype=dtype) if with_entropy else None
        for start in range(0, n, rows):
            end = start + rows
            z = prepare_logits(logits[start:end], temperature, suppress_ids)  # (rows, V)
            top = z.amax(-1, keepdim=True)
            z.sub_(top)  # z − max: ≤ 0, so exp cannot overflow
            p = z.exp()  # unnormalized probabilities
            total = p.sum(-1, keepdim=True)
            log_total = total.log()
            lse[start:end] = (top + log_total).squeeze(-1)
            logprobs[start:end] = (z.gather(-1, labels[start:end, None]) - log_total).squeeze(-1)
            if with_entropy:
                for i in suppress_ids:
                    z[:, i] = 0.0  # p_i = 0 there: drop the term instead of computing 0·(−inf)
                # H = lse − Σ p z = log Σ e^z' − Σ e^z' z' / Σ e^z'  with z' = z − max
                entropy[start:end] = (log_total - p.mul_(z).sum(-1, keepdim=True) / total).squeeze(-1)
        keep_entropy = with_entropy and entropy_grad
        ctx.save_for_backward(logits, labels, lse, entropy if keep_entropy else None)
        ctx.temperature, ctx.suppress_ids, ctx.rows = temperature, suppress_ids, rows
        ctx.set_materialize_grads(False)
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scale = 1.0 / ctx.temperature
        g = grad_logprobs * scale if grad_logprobs is not None else None  # (N,)
        g_h = grad_entropy * scale if grad_entropy is not None and entropy is not None else None  # (N,)
        if g is None and g_h is None:  # no gradient reached either output (undefined = zero)
            return (None,) * 7
        for start in range(0, logits.shape[0], ctx.rows):
            end = start + ctx.rows
            logp = prepare_logits(logits[start:end], ctx.temperature, ctx.suppress_ids).sub_(lse[start:end, None])
            out = grad_logits[start:end]  # p is written straight into it when the dtypes match
            grad = torch.exp(logp, out=out) if out.dtype == logp.dtype else logp.exp()  # (rows, V)
            if g_h is not None:
                coef = logp.add_(entropy[start:end, None]).mul_(-g_h[start:end, None])  # −g_H (log p + H)
                if g is not None:
                    coef.sub_(g[start:end, None])
                grad.mul_(coef)  # −p (g + g_H (log p + H))
            else:
                grad.mul_(-g[start:end, None])  # −p g
            if g is not None:
                grad.scatter_add_(-1, labels[start:end, None], g[start:end, None])  # + g at the label
            for i in ctx.suppress_ids:  # z_i is the constant −inf whatever the logit (this also clears 0·(−inf))
                grad[:, i] = 0.0
            if grad is not out:
                out.copy_(grad)
        return grad_logits, None, None, None, None, None, None


def logprobs_and_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                         suppress_ids: Sequence[int] | None = None, with_entropy: bool = True,
                         entropy_grad: bool = True, chunk_elements: int = CHUNK_ELEMENTS
                         ) -> tuple[Tensor, Tensor | None]:
    """log softmax(z)[labels] and H(softmax(z)), z = prepare_logits(logits, temperature, suppress_ids),
    from one pass over the logits. (…, V), (…) -> (logprobs (…), entropy (…) or None), float32.

    logprob = z_y − logsumexp(z);  H = logsumexp(z) − Σ softmax(z)·z  (= −Σ p log p, over the ids left).
    Memory: rows are processed max(1, chunk_elements // V) at a time, so at most two (rows, V) float32
    chunk buffers exist beyond the logits, forward or backward; the forward keeps (N,) values for the
    backward, which recomputes each chunk's softmax. The gradient has the logits' dtype and is exact.
    A label that is a suppressed id has probability 0: its log-prob is −inf (mask it out; its row's
    gradient stays finite). `entropy_grad=False` returns the entropy without a gradient and keeps nothing
    for it (PPO with entropy_coef 0). No host syncs.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    rows = max(1, chunk_elements // vocab)
    logprobs, entropy = _ChunkedLogprobsEntropy.apply(logits.reshape(-1, vocab), labels.reshape(-1),
                                                      float(temperature), tuple(suppress_ids or ()), rows,
                                                      with_entropy, with_entropy and entropy_grad)
    return logprobs.view(labels.shape), (entropy.view(labels.shape) if with_entropy else None)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                         suppress_ids: Sequence[int] | None = None) -> Tensor:
    """log softmax(prepare_logits(logits, temperature, suppress_ids)) at `labels`. (B, T, V), (B, T) -> (B, T)."""
    return logprobs_and_entropy(logits, labels, temperature, suppress_ids, with_entropy=False)[0]


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, suppress_ids: Sequence[int] | None = None) -> Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z per position, z = prepare_logits(…). (B, A, V) -> (B, A)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # scored, then dropped
    return logprobs_and_entropy(logits, labels, temperature, suppress_ids)[1]
