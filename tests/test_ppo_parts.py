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
    out, mask, ended = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


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
