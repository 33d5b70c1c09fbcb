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


@register_preference_loss("sigmoid", "DPO (with label_smoothing: conservative DPO)")
def _dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); conservative DPO with label smoothing ε (Mitchell 2023)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@register_preference_loss("ipo", "IPO on length-normalised log-probs", length_normalized=True)
def _dpo_ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17): regress the log-ratio gap to 1/(2β)
    return (h - 1 / (2 * beta)) ** 2


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, dict]:
    """h = (π_c − ref_c) − (π_r − ref_r); loss per `loss_type`, mean over B. Inputs (B,) summed logps
    (per-token averaged for `ipo`)."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(PREFERENCE_LOSSES)}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    loss = PREFERENCE_LOSSES[loss_type].fn(h, beta, label_smoothing).mean()
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"loss/dpo": loss.detach(), "rewards/chosen": chosen_reward.mean(),
             "rewards/rejected": rejected_reward.mean(),
             "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
             "rewards/margin": (chosen_reward - rejected_reward).mean(),
             "logps/chosen": policy_chosen_logps.detach().mean(),
             "logps/rejected": policy_rejected_logps.detach().mean()}
    return loss, stats
