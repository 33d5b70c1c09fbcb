"""The preference losses as pure functions of tensors: the reward model's pairwise loss and the registered losses
of the preference stage (`dpo.loss_type`, `rlhf.registry.PREFERENCE_LOSSES`).

Inputs are (B,) sequence log-probs (summed over response tokens, or their per-token mean where the loss declares
`length_normalized`); losses are means over the batch; stats are detached 0-dim tensors. Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.registry import PREFERENCE_LOSSES, register_preference_loss

Tensor = torch.Tensor


def pairwise_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[Tensor, dict]:
    """Bradley–Terry: −log σ(r_c − r_r − margin), mean over pairs; + center_coef·mean((r_c + r_r)²)
    (reward centering, Eisenstein et al. 2023). (B,), (B,) -> scalar. Ties count as wrong in accuracy."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards.float() + rejected_rewards.float()) ** 2).mean()
    both = torch.cat([chosen_rewards, rejected_rewards]).float().detach()
    stats = {"loss/pairwise": loss.detach(),
             "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().detach(),
             "rewards/margin": (chosen_rewards - rejected_rewards).float().mean().detach(),
             "rewards/chosen": chosen_rewards.float().mean().detach(),
             "rewards/rejected": rejected_rewards.float().mean().detach(),
             "rewards/mean": both.mean(), "rewards/std": both.std(unbiased=False)}
    return loss, stats


# The registered losses: (chosen, rejected, *, beta, label_smoothing, gamma) -> (B,) per-pair losses, where chosen
# and rejected are the policy's log-ratios to the reference (log π − log π_ref), or, for a `reference_free` loss,
# the policy's own log-probs; per-token means where the entry declares `length_normalized`.


@register_preference_loss("sigmoid", "DPO (with label_smoothing: conservative DPO)")
def _dpo_sigmoid(chosen: Tensor, rejected: Tensor, *, beta: float, label_smoothing: float, **_) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); conservative DPO with label smoothing ε (Mitchell 2023)
    h = chosen - rejected
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@register_preference_loss("ipo", "IPO on length-normalised log-probs", length_normalized=True)
def _dpo_ipo(chosen: Tensor, rejected: Tensor, *, beta: float, **_) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17): regress the log-ratio gap to 1/(2β)
    return (chosen - rejected - 1 / (2 * beta)) ** 2


@register_preference_loss("simpo", "SimPO: the length-normalised log-likelihood margin against a target margin "
                                   "dpo.simpo_gamma, no reference model", reference_free=True, length_normalized=True)
def _simpo(chosen: Tensor, rejected: Tensor, *, beta: float, label_smoothing: float, gamma: float, **_) -> Tensor:
    # SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ); label smoothing as DPO's
    z = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register_preference_loss("orpo", "ORPO: the chosen responses' NLL + beta x the log odds-ratio term, no reference "
                                  "model (from an SFT or a base model)", reference_free=True, length_normalized=True,
                          nll_weight=1.0)
def _orpo(chosen: Tensor, rejected: Tensor, *, beta: float, **_) -> Tensor:
    # ORPO (Hong et al. 2024, eq. 4–7): odds(y) = P/(1 − P) with P = exp of the per-token mean log-prob;
    # L_OR = −log σ(log odds(y_w) − log odds(y_l)), weighted by λ = beta; the NLL term is added by the stage
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None,
             ref_rejected_logps: Tensor | None, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, gamma: float = 0.0) -> tuple[Tensor, dict]:
    """The registered preference loss `loss_type` of the policy's (B,) sequence log-probs (summed, or per-token means
    where the loss is `length_normalized`), mean over B. A loss with a reference sees the log-ratios
    (π_c − ref_c), (π_r − ref_r); a `reference_free` one (ref_* None) the log-probs themselves. Implicit rewards:
    beta x what the loss sees."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only")
    entry = PREFERENCE_LOSSES[loss_type]
    if entry.reference_free != (ref_chosen_logps is None):
        raise ValueError(f"{loss_type} {'takes no' if entry.reference_free else 'needs'} reference log-probs")
    chosen_ratio = policy_chosen_logps if entry.reference_free else policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps if entry.reference_free else policy_rejected_logps - ref_rejected_logps
    loss = entry.fn(chosen_ratio, rejected_ratio, beta=beta, label_smoothing=label_smoothing, gamma=gamma).mean()
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"loss/dpo": loss.detach(), "rewards/chosen": chosen_reward.mean(),
             "rewards/rejected": rejected_reward.mean(),
             "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
             "rewards/margin": (chosen_reward - rejected_reward).mean(),
             "logps/chosen": policy_chosen_logps.detach().mean(),
             "logps/rejected": policy_rejected_logps.detach().mean()}
    return loss, stats
