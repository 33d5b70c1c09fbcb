"""The pure math of rlhf.losses against plain loops and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import (aggregate_loss, discounted_returns, dpo_loss, entropy_from_logits, gae, grpo_advantages,
                         kl_loss, kl_penalized_rewards, rloo_advantages,
                         logprobs_from_logits, masked_mean, masked_var, masked_whiten, pairwise_loss, per_token_kl,
                         ppo_policy_loss, ppo_value_loss, sequence_logps)



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in double precision (restored afterwards: other test modules use float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# three responses of lengths 4, 2 and 3 (right padding)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE written the plain way: one row at a time, one token at a time."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_matches_a_plain_loop_with_ragged_rows():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 4) * MASK, torch.randn(3, 4)
    adv, ret = gae(rewards, values, MASK, gamma=0.9, gae_lambda=0.8)
    ref_adv, ref_ret = gae_loop(rewards, values * MASK, MASK, 0.9, 0.8)
    assert torch.allclose(adv, ref_adv) and torch.allclose(ret, ref_ret)
    assert torch.all(adv[MASK == 0] == 0) and torch.all(ret[MASK == 0] == 0)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.9, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_masked_whiten_and_split_batch_means():
    torch.manual_seed(1)
    x = torch.randn(3, 4) * 3 + 2
    w = masked_whiten(x, MASK)
    assert masked_mean(w, MASK).abs() < 1e-9
    assert masked_var(w, MASK) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[MASK == 0] == 0)
    # two "processes" each holding part of the batch: global normalizer gives the whole-batch mean
    total = MASK.sum()
    halves = masked_mean(x[:1], MASK[:1], normalizer=total) + masked_mean(x[1:], MASK[1:], normalizer=total)
    assert halves == pytest.approx(float(masked_mean(x, MASK)))
    # precomputed (global) statistics are used as given
    assert torch.allclose(masked_whiten(x, MASK, mean=1.0, var=4.0), (x - 1.0) / math.sqrt(4.0 + 1e-8) * MASK)
    assert masked_mean(x, torch.zeros_like(MASK)) == 0  # empty mask: 0, not NaN


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(per_token_kl(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    r = torch.exp(ref - logp)
    assert torch.allclose(per_token_kl(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert torch.all(per_token_kl(torch.randn(5, 7), torch.randn(5, 7), "k3") >= 0)
    with pytest.raises(ValueError, match="k1, k3"):
        per_token_kl(logp, ref, "k2")


def test_rewards_put_the_score_on_the_last_real_token():
    kl = torch.ones(3, 4) * MASK
    rewards = kl_penalized_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, MASK, kl_coef=0.1)
    expected = -0.1 * MASK.clone()
    expected[0, 3] += 1.0
    expected[1, 1] += 2.0
    expected[2, 2] += 3.0
    assert torch.allclose(rewards, expected)
    empty = kl_penalized_rewards(torch.tensor([5.0]), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)
    assert torch.all(empty == 0)


@pytest.mark.parametrize("advantage, ratio, clipped", [
    (1.0, 1.5, True),    # good action pushed past 1+eps: clipped, no gradient
    (1.0, 0.5, False),   # good action made less likely: unclipped branch, gradient flows
    (-1.0, 0.5, True),   # bad action pushed below 1-eps: clipped
    (-1.0, 1.5, False),  # bad action made more likely: unclipped (pessimistic) branch
    (1.0, 1.1, False),   # inside the trust region
])
def test_policy_loss_clipping_branches(advantage, ratio, clipped):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    adv, mask = torch.tensor([[advantage]]), torch.ones(1, 1)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    eps = 0.2
    expected = max(-advantage * ratio, -advantage * min(max(ratio, 1 - eps), 1 + eps))
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert (logp.grad.abs().item() == 0) == clipped
    assert stats["policy/clipfrac"].item() == float(clipped)
    assert stats["policy/approx_kl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2)


def test_policy_loss_clamps_ratio_explosions():
    logp = torch.tensor([[1000.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, 1.0]]),
                                  torch.ones(1, 2), clip_range=0.2, max_log_ratio=20.0)
    assert torch.isfinite(loss) and stats["policy/ratio_clamped"].item() == 1


def test_policy_loss_token_weighting_with_normalizer():
    torch.manual_seed(2)
    logp, old, adv = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    whole, _ = ppo_policy_loss(logp, old, adv, MASK, 0.2)
    parts = sum(ppo_policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], MASK[i:i + 1], 0.2,
                                normalizer=MASK.sum())[0] for i in range(3))
    assert parts == pytest.approx(whole.item())
    loop = 0.0
    for b in range(3):
        for t in range(4):
            if MASK[b, t]:
                r = math.exp(logp[b, t] - old[b, t])
                loop += max(-adv[b, t] * r, -adv[b, t] * min(max(r, 0.8), 1.2))
    assert whole.item() == pytest.approx(loop / MASK.sum().item())


def test_value_loss_clipping_both_sides():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, -1.0]])
    returns = torch.tensor([[2.0, 0.5]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 1: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; token 2: (-1-0.5)^2=2.25 vs (-0.2-0.5)^2=0.49
    assert loss.item() == pytest.approx(0.5 * (3.24 + 2.25) / 2)
    assert stats["value/clipfrac"].item() == pytest.approx(0.5)


def test_entropy_and_logprobs_against_direct_formulas():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 7)
    p = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(entropy_from_logits(logits, 0.7).double(), -(p * p.log()).sum(-1), atol=1e-5)
    labels = torch.randint(0, 7, (2, 3))
    direct = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels, 0.7).double(), direct, atol=1e-5)
    before = logits.clone()
    logprobs_from_logits(logits, labels, 0.5)
    assert torch.equal(logits, before)  # inputs are not edited in place


def test_sequence_logps_sum_and_average():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, 0.0, 0.0], [-2.0, -2.0, -2.0, 0.0]])
    assert torch.allclose(sequence_logps(lp, MASK), torch.tensor([-10.0, -2.0, -6.0]))
    assert torch.allclose(sequence_logps(lp, MASK, average=True), torch.tensor([-2.5, -1.0, -2.0]))


def test_pairwise_loss_by_hand():
    loss, stats = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    loss, _ = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    loss, stats = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), center_coef=0.1)
    bt = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(bt + 0.1 * (9 + 1) / 2)
    assert stats["rewards/accuracy"].item() == 0.5 and stats["rewards/margin"].item() == 0.0
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0]))[1]["rewards/accuracy"].item() == 0  # a tie


def test_dpo_losses_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    h = (-1.0 + 2.0) - (-3.0 + 2.5)  # 1.5
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1 * h)))
    assert stats["rewards/chosen"].item() == pytest.approx(0.1)
    assert stats["rewards/rejected"].item() == pytest.approx(-0.05)
    assert stats["rewards/accuracy"].item() == 1.0 and stats["logps/chosen"].item() == -1.0
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15)))
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((h - 1 / 0.2) ** 2)
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        dpo_loss(pc, pr, rc, rr, 0.1, loss_type="hinge")


def test_dpo_gradient_matches_the_formula_at_small_beta():
    beta = 1e-3
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -1.5])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    h = (pc.detach() - rc) - (pr - rr)
    expected = -beta * torch.sigmoid(-beta * h) / 2  # d/dπ_c of mean(−log σ(βh))
    assert torch.allclose(pc.grad, expected, rtol=1e-6)
    assert torch.allclose(pc.grad, torch.full((2,), -beta / 4), rtol=1e-3)  # σ(0) = 1/2 as β → 0


# --- critic-free estimators (issue: GRPO, RLOO, REINFORCE++) ------------------------------------------------------


def test_grpo_advantages_against_a_plain_loop():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.5, -2.0, 4.0, 1.0])
    k = 4
    for scale in (True, False):
        got = grpo_advantages(scores, k, scale_by_std=scale)
        for g in range(len(scores) // k):
            group = scores[g * k:(g + 1) * k].tolist()
            mean = sum(group) / k
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))  # Bessel-corrected
            for i, x in enumerate(group):
                expected = (x - mean) / (std + 1e-6) if scale else x - mean
                assert got[g * k + i].item() == pytest.approx(expected, abs=1e-9)
    assert torch.all(grpo_advantages(scores, k)[4:8] == 0)  # a group that scores alike teaches nothing


def test_rloo_advantages_against_a_plain_loop():
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0, -1.0, 1.0])
    for k in (2, 3):
        got = rloo_advantages(scores, k)
        for i, x in enumerate(scores.tolist()):
            group = scores[(i // k) * k:(i // k + 1) * k].tolist()
            others = sum(group) - x
            assert got[i].item() == pytest.approx(x - others / (k - 1), abs=1e-12)


def test_discounted_returns_against_a_plain_loop():
    torch.manual_seed(3)
    rewards = torch.randn(3, 4)
    for gamma in (1.0, 0.9):
        got = discounted_returns(rewards, MASK, gamma)
        for b in range(3):
            n = int(MASK[b].sum())
            for t in range(4):
                expected = sum(gamma ** (s - t) * rewards[b, s].item() for s in range(t, n)) if t < n else 0.0
                assert got[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_token_and_sequence_aggregation_weigh_responses_differently():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # MASK rows hold 4, 2 and 3 tokens
    assert aggregate_loss(values, MASK, "token").item() == pytest.approx((4 + 8) / 9)
    assert aggregate_loss(values, MASK, "sequence").item() == pytest.approx((1 + 4 + 0) / 3)
    # split over two "processes" with the global counts as normalizers: the sums give the whole batch's value
    for how, total in (("token", MASK.sum()), ("sequence", 3.0)):
        split = aggregate_loss(values[:1], MASK[:1], how, total) + aggregate_loss(values[1:], MASK[1:], how, total)
        assert split.item() == pytest.approx(aggregate_loss(values, MASK, how).item())
    with pytest.raises(ValueError, match="token or sequence"):
        aggregate_loss(values, MASK, "rows")


def test_kl_loss_is_the_k3_estimate_with_a_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = kl_loss(logp, ref, torch.ones(1, 2))
    r = torch.exp(ref - logp.detach())
    assert loss.item() == pytest.approx(((r - 1) - torch.log(r)).mean().item())
    loss.backward()
    assert torch.allclose(logp.grad, (1 - r) / 2)  # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)
    assert stats["loss/kl"] == loss.detach()
