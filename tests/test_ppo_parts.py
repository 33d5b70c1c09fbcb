"""Pieces of the PPO iteration that are not in rlhf.losses: minibatch partition, score shaping,
value alignment, rollout truncation, seeded sampling, KL controllers."""

from __future__ import annotations

import torch

from rlhf.kl_control import AdaptiveKLController, FixedKLController
from rlhf.ppo import minibatch_rows, shape_scores
from rlhf.rollout import filter_logits, gumbel_noise, row_keys, truncate_after_eos


def global_partition(rows: int, processes: int, minibatches: int, epoch: int) -> dict[int, set[int]]:
    local = rows // processes
    out = {}
    for m in range(minibatches):
        out[m] = {rank * local + i for rank in range(processes)
                  for i in minibatch_rows(local, rank * local, minibatches, epoch, m)}
    return out


def test_minibatches_are_the_same_for_any_process_count_and_balanced():
    for epoch in range(3):
        one = global_partition(16, 1, 4, epoch)
        assert sorted(j for s in one.values() for j in s) == list(range(16))  # each row exactly once
        for processes in (2, 4):
            assert global_partition(16, processes, 4, epoch) == one
            for m in range(4):  # every process holds the same share of every minibatch
                counts = [len(minibatch_rows(16 // processes, r * 16 // processes, 4, epoch, m))
                          for r in range(processes)]
                assert counts == [4 // processes] * processes
    assert global_partition(16, 1, 4, 0) != global_partition(16, 1, 4, 1)  # epochs regroup the rows


def test_shape_scores_penalty_then_clip():
    raw = torch.tensor([1.0, 5.0, -20.0])
    ended = torch.tensor([True, False, True])
    assert torch.equal(shape_scores(raw, ended, 1.0, 3.0), torch.tensor([1.0, 3.0, -3.0]))
    assert torch.equal(shape_scores(raw, ended, None, None), raw)


def test_truncate_after_first_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, ended = truncate_after_eos(responses, [eos], pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_truncate_after_the_first_of_several_stop_ids():
    """EOS (2) and an end-of-turn id (7): a row ends at whichever comes first."""
    responses = torch.tensor([[5, 7, 2, 9], [5, 6, 2, 7], [5, 6, 8, 9]])
    out, mask, ended = truncate_after_eos(responses, [2, 7], 0)
    assert out.tolist() == [[5, 7, 0, 0], [5, 6, 2, 0], [5, 6, 8, 9]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_seeded_noise_is_per_row_and_gumbel_distributed():
    keys = row_keys(3, 7, [10, 11, 12])
    again = row_keys(3, 7, [12])
    assert torch.equal(gumbel_noise(keys, 2, 50)[2], gumbel_noise(again, 2, 50)[0])  # batch independent
    assert not torch.equal(gumbel_noise(keys, 2, 50)[0], gumbel_noise(keys, 3, 50)[0])
    big = gumbel_noise(row_keys(0, 0, range(200)), 0, 100)
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.var().item() - 1.6449) < 0.1  # Gumbel(0, 1)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    # the token that crosses top_p is kept: 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.15
    assert torch.isinf(filter_logits(logits, 0, 0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.4)).tolist() == [[False, True, True, True]]


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 1000)  # error clipped to +0.2: beta *= 1 + 0.2 * 0.1
    assert abs(adaptive.value - 0.1 * 1.02) < 1e-12
    adaptive.update(3.0, 1000)  # error -0.5 clipped to -0.2
    assert abs(adaptive.value - 0.1 * 1.02 * 0.98) < 1e-12
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_rollout_metrics_means_and_explained_variance():
    from accelerate import Accelerator

    from rlhf.losses import kl_penalized_rewards
    from rlhf.ppo import Experience, rollout_metrics

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 2.0], [4.0, 6.0, 0.0]])  # residuals 0, 0, 1, 0, -1
    zeros = torch.zeros(2, 3)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    scores = torch.tensor([0.0, 2.0])
    exp = Experience(sequences=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5), prompt_width=2,
                     response_mask=mask, ended=torch.tensor([True, False]), raw_scores=torch.tensor([1.0, 3.0]),
                     scores=scores, old_logprobs=zeros, ref_logprobs=zeros, old_values=values, entropy=mask * 0.5,
                     kl=kl, rewards=kl_penalized_rewards(scores, kl * mask, mask, 0.1), advantages=zeros,
                     returns=returns, sources={"reward_model": torch.tensor([1.0, 3.0])})
    out = rollout_metrics(Accelerator(cpu=True), exp, kl_coef=0.1, rows_global=2, generate_s=0.5)
    # explained variance over the 5 real tokens, with population variances: 1 - Var[R - V] / Var[R]
    real = mask.bool()
    expected = 1 - (returns - values)[real].var(unbiased=False) / returns[real].var(unbiased=False)
    assert abs(out["value/explained_var"] - expected.item()) < 1e-6
    assert abs(out["objective/kl"] - 0.75) < 1e-6  # (0.6 + 0.9) / 2: the padded 9.0 does not count
    assert abs(out["objective/non_score_reward"] + 0.075) < 1e-6
    assert out["objective/score"] == 2.0 and out["objective/score_shaped"] == 1.0
    assert out["response/length"] == 2.5 and out["response/eos_rate"] == 0.5 and out["objective/entropy"] == 0.5
    assert out["perf/generate_tokens_per_s"] == 10.0


def test_micro_batch_sets_the_accumulation_boundary_flag():
    """DeepSpeed's engine steps inside `backward` whenever accelerate's sync_gradients flag is set: every
    micro-batch but the last must clear it (through accelerate's public setter)."""
    from accelerate import Accelerator

    from rlhf.runtime import micro_batch

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    seen = []
    for i in range(3):
        with micro_batch(accelerator, [model], last=i == 2):
            seen.append(accelerator.sync_gradients)
    assert seen == [False, False, True]
