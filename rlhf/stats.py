"""Judged win rates with bootstrap intervals: plain numbers in, plain numbers out (imports only torch).

A judge (a reward model) scores each model's response and the baseline's response to the same prompt;
the comparison is won, tied or lost prompt by prompt, and the rates get a percentile bootstrap interval
over prompts (Efron & Tibshirani 1993, ch. 13): prompts are the unit that was sampled.
"""

from __future__ import annotations

import torch

WIN, TIE, LOSS = 1, 0, -1


def outcomes(model_scores, baseline_scores, tie_margin: float = 0.0, same=None) -> torch.Tensor:
    """(N,) judge scores of the model's and the baseline's response to each of N prompts -> (N,) WIN where
    model > baseline + tie_margin, LOSS where model < baseline - tie_margin, TIE otherwise. `same` (N,) bool
    marks identical responses: always a tie (their scores may differ by padding round-off)."""
    diff = torch.as_tensor(model_scores, dtype=torch.float64) - torch.as_tensor(baseline_scores, dtype=torch.float64)
    out = (diff > tie_margin).long() - (diff < -tie_margin).long()
    if same is not None:
        out = out.masked_fill(torch.as_tensor(same, dtype=torch.bool), TIE)
    return out


def win_rates(model_scores, baseline_scores, tie_margin: float = 0.0, n_boot: int = 1000, seed: int = 0,
              same=None) -> dict:
    """Win / tie / loss rates of a model against a baseline over N prompts, each with a 95 % interval.

    Bootstrap: B = n_boot sets of N prompt indices drawn with replacement (`torch.randint` from a generator
    seeded with `seed`), (B, N); each set's rate; the interval is the 2.5th and 97.5th percentile of the B
    rates, linearly interpolated (as numpy.percentile). Plain loop:
        for b in range(B): rate[b] = sum(o[i] == WIN for i in idx[b]) / N
    Returns {'win', 'tie', 'loss', 'win_ci', 'tie_ci', 'loss_ci', 'prompts', 'n_boot', 'tie_margin'}; rates are
    None when N is 0.
    """
    o = outcomes(model_scores, baseline_scores, tie_margin, same)  # (N,)
    n = o.numel()
    out: dict = {"prompts": n, "n_boot": n_boot, "tie_margin": tie_margin}
    if n == 0:
        return out | {k: None for k in ("win", "tie", "loss", "win_ci", "tie_ci", "loss_ci")}
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))  # (B, N)
    resampled = o[idx]  # (B, N)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    for name, value in (("win", WIN), ("tie", TIE), ("loss", LOSS)):
        rates = (resampled == value).double().mean(1)  # (B,)
        out[name] = (o == value).double().mean().item()
        out[f"{name}_ci"] = torch.quantile(rates, q).tolist()
    return out
