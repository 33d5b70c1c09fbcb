"""The pure math of rlhf.losses against plain loops and hand-computed values; and the log-probs the update
computes against those the rollout engine sampled with."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import (aggregate_loss, discounted_returns, dpo_loss, gae, grpo_advantages, kl_loss,
                         kl_penalized_rewards, masked_mean, masked_var, masked_whiten, pairwise_loss, per_token_kl,
                         ppo_policy_loss, ppo_value_loss, rloo_advantages, segment_sums, sequence_logps)
from rlhf.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits, prepare_logits


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


def test_segment_sums_match_a_loop():
    x = torch.randn(3, 7)
    segments = torch.randint(-1, 4, (3, 7))
    expected = torch.zeros(5)
    for value, s in zip(x.flatten().tolist(), segments.flatten().tolist()):
        if s >= 0:
            expected[s] += value
    assert torch.allclose(segment_sums(x, segments, 5), expected, atol=1e-6)
    assert segment_sums(x, segments, 5)[4] == 0  # a segment with no members sums to 0


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


def direct_logprobs_and_entropy(logits, labels, temperature, suppress_ids=()):
    """The textbook formulas on the whole (B, T, V) tensor: log_softmax, gathered, and −Σ p log p."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    z[..., list(suppress_ids)] = float("-inf")
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 7, 30])  # 15 rows: chunks of 1, 4 (3 + 3 rows), 7 (2 + 1), all
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_the_direct_formulas_in_float32(rows_per_chunk, temperature):
    torch.manual_seed(4)
    vocab = 50
    logits = (torch.randn(3, 5, vocab, dtype=torch.float32) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (3, 5))
    weights = torch.randn(2, 3, 5, dtype=torch.float32)
    lp, ent = logprobs_and_entropy(logits, labels, temperature, chunk_elements=rows_per_chunk * vocab)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (3, 5)
    (grad,) = torch.autograd.grad((weights[0] * lp + weights[1] * ent).sum(), logits)
    ref_lp, ref_ent = direct_logprobs_and_entropy(logits, labels, temperature)
    (ref_grad,) = torch.autograd.grad((weights[0] * ref_lp + weights[1] * ref_ent).sum(), logits)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    # the one-output wrappers give the same numbers
    assert torch.equal(logprobs_from_logits(logits, labels, temperature), lp)
    assert torch.allclose(entropy_from_logits(logits, temperature), ent)


@pytest.mark.parametrize("outputs", ["logprobs", "entropy", "both"])
def test_chunked_gradients_are_exact_in_float64(outputs):
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.tensor([[0, 6, 2], [5, 5, 1]])  # never the suppressed id 3

    def f(x):  # chunks of 2 rows over 6: the boundaries cross the batch rows
        lp, ent = logprobs_and_entropy(x, labels, temperature=0.7, suppress_ids=[3], chunk_elements=14)
        return {"logprobs": lp, "entropy": ent, "both": (lp, ent)}[outputs]

    assert torch.autograd.gradcheck(f, (logits,))


def test_forward_keeps_nothing_vocabulary_sized_for_the_backward():
    """Besides (views of) the logits, only (N,) values are saved; none for an entropy without gradient."""
    logits = torch.randn(2, 3, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))

    def saved_shapes(**kwargs):
        shapes = []

        def pack(t):
            if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, ent = logprobs_and_entropy(logits, labels, temperature=0.7, suppress_ids=[4], **kwargs)
        return shapes, ent

    shapes, ent = saved_shapes()
    assert sorted(shapes) == [(6,)] * 3 and ent.requires_grad  # labels, log-normalizer, entropy
    shapes, ent = saved_shapes(entropy_grad=False)
    assert sorted(shapes) == [(6,)] * 2 and not ent.requires_grad


def test_bfloat16_logits_give_float32_results_and_a_bfloat16_gradient():
    torch.manual_seed(6)
    logits = (torch.randn(4, 6, 33, dtype=torch.float32) * 2).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 33, (4, 6))
    lp, ent = logprobs_and_entropy(logits, labels, 0.7, chunk_elements=5 * 33)
    ref_lp, ref_ent = direct_logprobs_and_entropy(logits.detach().float(), labels, 0.7)
    assert lp.dtype == ent.dtype == torch.float32
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    exact = logits.detach().float().requires_grad_(True)
    (sum(direct_logprobs_and_entropy(exact, labels, 0.7)[i].sum() for i in range(2))).backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.allclose(logits.grad.float(), exact.grad, atol=1e-2, rtol=1e-2)  # bf16 rounding


def test_prepare_logits_scales_and_suppresses_without_editing_its_input():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.float32)
    before = logits.clone()
    z = prepare_logits(logits, temperature=0.5, suppress_ids=[1])
    assert torch.equal(z, torch.tensor([[2.0, float("-inf"), 6.0], [1.0, float("-inf"), 8.0]]))
    assert torch.equal(logits, before) and z.dtype == torch.float32
    assert torch.equal(prepare_logits(logits.bfloat16()), logits.bfloat16().float())  # an upcast copy
    assert prepare_logits(logits) is not logits


def test_suppressed_ids_give_the_log_softmax_over_the_remaining_ids():
    torch.manual_seed(7)
    vocab, suppress = 9, [0, 5]
    keep = [i for i in range(vocab) if i not in suppress]
    logits = torch.randn(3, 4, vocab, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor(keep)[torch.randint(0, len(keep), (3, 4))]
    labels[1, 2] = 5  # a suppressed id as a label (pad after EOS): probability 0
    lp, ent = logprobs_and_entropy(logits, labels, 0.7, suppress_ids=suppress, chunk_elements=2 * vocab)
    remaining = torch.log_softmax(logits.detach()[..., keep] / 0.7, -1)  # (3, 4, 7)
    index = torch.tensor([keep.index(int(i)) if int(i) in keep else 0 for i in labels.flatten()]).view(3, 4)
    expected = remaining.gather(-1, index[..., None]).squeeze(-1)
    valid = labels != 5
    assert torch.allclose(lp[valid], expected[valid], atol=1e-6)
    assert lp[1, 2].item() == float("-inf")
    assert torch.allclose(ent, -(remaining.exp() * remaining).sum(-1), atol=1e-6)
    # the −inf row, masked out, leaves every gradient finite; suppressed logits get none
    (lp.masked_fill(~valid, 0.0).sum() + ent.sum()).backward(retain_graph=True)
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[..., suppress] == 0)
    exact = logits.detach().clone().requires_grad_(True)
    ref_lp, ref_ent = direct_logprobs_and_entropy(exact, labels.masked_fill(~valid, 1), 0.7, suppress)
    (ref_lp.masked_fill(~valid, 0.0).sum() + ref_ent.sum()).backward()
    assert torch.allclose(logits.grad, exact.grad, atol=1e-6)
    # unmasked, the −inf log-prob still has the finite gradient −p/τ (0 at its own, suppressed, logit)
    (grad,) = torch.autograd.grad(lp[1, 2], logits)
    p = torch.softmax(prepare_logits(logits.detach()[1, 2], 0.7, suppress), -1)
    assert grad[1, 2, 5] == 0 and torch.allclose(grad[1, 2], -p / 0.7, atol=1e-6)


def test_the_update_scores_a_rollout_under_the_distribution_it_was_sampled_from():
    """Issue 15: the seeded engine samples with the pad id forbidden; the update must use the same softmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.forward import response_logprobs
    from rlhf.rollout import row_keys, seeded_generate
    from rlhf.sections import GenerateSection

    torch.manual_seed(8)
    pad, eos, temperature = 0, 2, 0.7
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=pad)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    prompts = torch.randint(3, 100, (4, 6))
    attention = torch.ones_like(prompts)
    prompts[:2, :2], attention[:2, :2] = pad, 0  # left padding
    steps = []  # the engine's logits at each decoding step, (B, V) each
    hook = model.register_forward_hook(lambda module, args, out: steps.append(out.logits[:, -1].detach().clone()))
    gen = seeded_generate(model, prompts, attention, GenerateSection(max_new_tokens=12, temperature=temperature),
                          stop_ids=[eos], pad_id=pad, keys=row_keys(0, 0, range(4)))
    hook.remove()
    mask = gen.response_mask.bool()
    assert len(steps) == gen.responses.shape[1] and not (gen.responses[mask] == pad).any()
    sampled_with = prepare_logits(torch.stack(steps, 1), temperature, [pad]).log_softmax(-1)  # (B, A, V)
    sampled_with = sampled_with.gather(-1, gen.responses[..., None]).squeeze(-1)  # (B, A)
    with torch.no_grad():
        update, _ = response_logprobs(model, gen.sequences, gen.attention_mask, gen.prompt_width, temperature,
                                      suppress_ids=[pad])
        full_softmax, _ = response_logprobs(model, gen.sequences, gen.attention_mask, gen.prompt_width, temperature)
    assert torch.allclose(update[mask], sampled_with[mask], atol=1e-5)
    assert torch.all(update[~mask] == 0)  # padding after EOS: 0, not −inf
    # the full softmax gives every token log(1 − p_pad) less: the rollout would be off-policy
    assert torch.all((update - full_softmax)[mask] > 1e-4)


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
    with pytest.raises(ValueError, match="choose one of token, sequence, sequence_sum, constant"):
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
