"""The registered algorithms (rlhf.registry): advantage estimators, policy losses, preference losses. Recipe
validation and help read the registries; every statistic a loss returns is reduced as it declares."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from rlhf.cli import main, stage_help
from rlhf.dynamic_sampling import Round, dynamic_sample
from rlhf.losses import LOSS_AGGREGATIONS, aggregate_loss, informative_groups, loss_normalizer, overlong_penalty
from rlhf.ppo import UpdateStats
from rlhf.preference_losses import dpo_loss
from rlhf.rollout import Generation
from rlhf.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES
from tests.chain import cli_args, run_stage


def test_the_help_and_the_accepted_names_come_from_the_registries():
    ppo_help, dpo_help = "\n".join(stage_help("ppo")), "\n".join(stage_help("dpo"))
    for name in ADVANTAGE_ESTIMATORS:
        assert f"{name} = {ADVANTAGE_ESTIMATORS[name].help}" in ppo_help
    for name in POLICY_LOSSES:
        assert f"{name} = {POLICY_LOSSES[name].help}" in ppo_help
    for name in PREFERENCE_LOSSES:
        assert f"{name} = {PREFERENCE_LOSSES[name].help}" in dpo_help
    assert ADVANTAGE_ESTIMATORS["gae"].needs_critic and not ADVANTAGE_ESTIMATORS["grpo"].needs_critic
    assert ADVANTAGE_ESTIMATORS["rloo"].needs_groups and ADVANTAGE_ESTIMATORS["reinforce_pp"].whiten == "always"


def test_an_unknown_estimator_lists_the_registered_names(chain, tmp_path, capsys):
    assert main(cli_args("ppo", chain["root"], "ppo.advantage_estimator=vtrace", f"output_dir={tmp_path}/o")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "ppo.advantage_estimator: expected one of " in err and all(repr(n) in err for n in ADVANTAGE_ESTIMATORS)
    assert not (tmp_path / "o").exists()


def test_every_statistic_is_reduced_as_declared_and_none_is_dropped():
    stats = UpdateStats({"loss/policy": "sum", "policy/clipfrac": "mean", "policy/ratio_max": "max",
                         "policy/ratio_clamped": "total"})
    for loss, clipfrac, ratio, share in ((0.25, 0.5, 1.5, 0.75), (0.5, 1.0, 1.2, 0.25)):  # two micro-batches
        stats.add({"loss/policy": torch.tensor(loss), "policy/clipfrac": torch.tensor(clipfrac),
                   "policy/ratio_max": torch.tensor(ratio), "policy/ratio_clamped": torch.tensor(1.0)},
                  torch.tensor(share))
    out = stats.reduce(OneProcess(), updates=1)
    assert out == pytest.approx({"loss/policy": 0.75, "policy/clipfrac": 0.625, "policy/ratio_max": 1.5,
                                 "policy/ratio_clamped": 2.0})
    with pytest.raises(KeyError, match="'policy/new' declares no reduction"):
        stats.add({"policy/new": torch.tensor(1.0)}, torch.tensor(1.0))


# --- the RL formulas against plain loops -------------------------------------------------------------------------

B, A = 4, 6


def rl_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, A, generator=g, dtype=torch.float64) * 2
    old = logprobs + 0.3 * torch.randn(B, A, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
                        dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logprobs, old, adv, mask


def loop_aggregate(values, mask, loss_agg, max_tokens):
    rows = [[float(values[i, t]) for t in range(A) if mask[i, t]] for i in range(B)]
    if loss_agg == "token":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if loss_agg == "sequence":
        return sum(sum(r) / len(r) for r in rows) / B
    if loss_agg == "sequence_sum":
        return sum(sum(r) for r in rows) / B
    return sum(sum(r) for r in rows) / (B * max_tokens)  # constant


@pytest.mark.parametrize("loss_agg", list(LOSS_AGGREGATIONS))
def test_every_aggregation_matches_a_plain_loop_and_splits_across_micro_batches(loss_agg):
    values, _, _, mask = rl_batch()
    expected = loop_aggregate(values, mask, loss_agg, max_tokens=8)
    assert float(aggregate_loss(values, mask, loss_agg, max_tokens=8)) == pytest.approx(expected, abs=1e-12)
    # two micro-batches (as two processes would hold them), each divided by the global count, sum to the whole
    normalizer = loss_normalizer(loss_agg, mask.sum(), float(B), 8)
    parts = [aggregate_loss(values[i:i + 2], mask[i:i + 2], loss_agg, normalizer, 8) for i in (0, 2)]
    assert float(sum(parts)) == pytest.approx(expected, abs=1e-12)


def loop_policy_loss(logprobs, old, adv, mask, low, high, sequence_ratio):
    per_token = torch.zeros(B, A, dtype=torch.float64)
    for i in range(B):
        n = int(mask[i].sum())
        seq = math.exp(sum(float(logprobs[i, t] - old[i, t]) for t in range(n)) / n)
        for t in range(n):
            ratio = seq if sequence_ratio else math.exp(float(logprobs[i, t] - old[i, t]))
            clipped = min(max(ratio, 1 - low), 1 + high)
            per_token[i, t] = max(-adv[i] * ratio, -adv[i] * clipped)
    return per_token


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", list(LOSS_AGGREGATIONS))
def test_clipped_objectives_match_a_plain_loop(ratio_level, loss_agg):
    logprobs, old, adv, mask = rl_batch(1)
    low, high = 0.1, 0.28  # clip-higher
    per_token = loop_policy_loss(logprobs, old, adv, mask, low, high, ratio_level == "sequence")
    expected = loop_aggregate(per_token, mask, loss_agg, max_tokens=8)
    loss, stats = POLICY_LOSSES[ratio_level].fn(logprobs, old, adv[:, None] * mask, mask, clip_range=low,
                                                clip_range_high=high, loss_agg=loss_agg, max_tokens=8)
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert set(stats) == set(POLICY_LOSSES[ratio_level].stats)  # every statistic declares its reduction


def test_overlong_penalty_and_informative_groups():
    lengths = torch.tensor([4, 12, 13, 15, 16])
    # max 16, buffer 4: free up to 12 tokens, then -1/4 per token to -1 at the limit (DAPO eq. 13)
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.75, -1.0]
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.375, -0.5]
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0])
    assert informative_groups(scores, 3).tolist() == [False, False, True]


class OneProcess:
    num_processes, device = 1, "cpu"

    def gather(self, x):
        return x


def fake_round(scores: list[float], prompt_width: int, response_width: int, tag: int) -> Round:
    n = len(scores)
    seq = torch.full((n, prompt_width + response_width), tag)
    gen = Generation(sequences=seq, attention_mask=torch.ones_like(seq), response_mask=torch.ones(n, response_width),
                     ended=torch.ones(n, dtype=torch.bool), prompt_width=prompt_width)
    scores = torch.tensor(scores)
    return Round([{"tag": tag}] * n, gen, scores, {"reward_fn": scores}, scores)


def test_dynamic_sampling_keeps_informative_groups_from_extra_rounds():
    rounds = [fake_round([1, 1, 0, 1], 3, 2, tag=1),  # group 0 uninformative, group 1 kept
              fake_round([0, 0, 0, 0], 5, 4, tag=2),  # both dropped
              fake_round([0, 1, 1, 1], 2, 3, tag=3)]  # group 0 fills the batch
    out, metrics = dynamic_sample(OneProcess(), lambda r: rounds[r], group_size=2, max_rounds=3, pad_id=0)
    assert metrics == {"rollout/dropped_groups": 4.0, "rollout/filled_groups": 0.0, "rollout/sampling_rounds": 3.0}
    assert out.scores.tolist() == [0.0, 1.0, 0.0, 1.0] and [p["tag"] for p in out.batch] == [1, 1, 3, 3]
    gen = out.gen
    assert gen.prompt_width == 3 and gen.sequences.shape == (4, 6)  # the widest prompt, the longest response
    assert gen.attention_mask[2].tolist() == [0, 1, 1, 1, 1, 1]  # round 3's prompt was 1 token narrower: left pad
    assert gen.response_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    # the rounds run out: the share is completed with dropped groups, counted
    out, metrics = dynamic_sample(OneProcess(), lambda r: rounds[1], group_size=2, max_rounds=1, pad_id=0)
    assert metrics["rollout/filled_groups"] == 2.0 and metrics["rollout/sampling_rounds"] == 2.0
    assert out.scores.shape == (4,)


# --- cross-checks against TRL's GRPOTrainer loss (skipped without TRL) ----------------------------------------------


def trl_grpo_loss(loss_type, level, logprobs, old, adv, mask, low, high, max_tokens):
    """TRL's own `GRPOTrainer._compute_loss` on this batch (one process, no KL term, no accumulation); the model's
    forward replaced by the given log-probs."""
    trl = pytest.importorskip("trl")
    trainer = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                  reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x)
    trainer.__dict__.update(
        accelerator=accelerator, model=SimpleNamespace(training=True), top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=0.0, loss_type=loss_type,
        epsilon_low=low, epsilon_high=high, use_vllm=False, max_completion_length=max_tokens,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None))
    ids = torch.zeros(B, A, dtype=torch.long)
    inputs = {"prompt_ids": ids[:, :1], "prompt_mask": torch.ones(B, 1, dtype=torch.long), "completion_ids": ids,
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    return trainer._compute_loss(None, inputs)


@pytest.mark.parametrize("loss_type, ratio_level, loss_agg, low, high", [
    ("dr_grpo", "token", "constant", 0.2, 0.2),  # Dr. GRPO
    ("dapo", "token", "token", 0.2, 0.28),  # DAPO: clip-higher, token aggregation
    ("grpo", "sequence", "sequence", 3e-4, 4e-4),  # GSPO: importance_sampling_level="sequence"
    ("luspo", "token", "sequence_sum", 0.2, 0.2),  # per-response token sum, averaged over responses
])
def test_the_policy_losses_equal_trl_grpo_trainer(loss_type, ratio_level, loss_agg, low, high):
    logprobs, old, adv, mask = rl_batch(2)
    logprobs, old = logprobs.float(), old.float()
    ours_lp = logprobs.clone().requires_grad_(True)
    theirs_lp = logprobs.clone().requires_grad_(True)
    theirs = trl_grpo_loss(loss_type, ratio_level, theirs_lp, old, adv.float(), mask.float(), low, high, 8)
    ours, _ = POLICY_LOSSES[ratio_level].fn(ours_lp, old, adv.float()[:, None] * mask.float(), mask.float(),
                                            clip_range=low, clip_range_high=high, loss_agg=loss_agg, max_tokens=8)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_lp.grad * mask, theirs_lp.grad * mask, atol=1e-5)


# --- recipes: bad input, and the shipped dr_grpo / dapo / gspo recipes on the tiny chain ----------------------------


@pytest.mark.parametrize("name, overrides, key, message", [
    ("dapo", ["ppo.clip_range_low=0.3", "ppo.clip_range_high=0.2"], "ppo.clip_range_low",
     "clip_range_low (0.3) is above clip_range_high (0.2)"),
    ("dapo", ["ppo.overlong_buffer=9"], "ppo.overlong_buffer",
     "the overlong buffer (9 tokens) is longer than generate.max_new_tokens (8)"),
    ("dapo", ["ppo.samples_per_prompt=1", "ppo.advantage_estimator=reinforce_pp"], "ppo.dynamic_sampling",
     "needs samples_per_prompt >= 2, got 1"),
    ("gspo", ["ppo.ratio_level=sentence"], "ppo.ratio_level", "expected one of 'token', 'sequence'"),
    ("dr_grpo", ["ppo.loss_agg=mean"], "ppo.loss_agg", "expected one of 'token', 'sequence', 'sequence_sum'"),
])
def test_bad_rl_settings_are_one_line(chain, tmp_path, capsys, name, overrides, key, message):
    assert main(cli_args(name, chain["root"], *overrides, f"output_dir={tmp_path}/o")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ") and f": {key}: " in err and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["dr_grpo", "dapo", "gspo"])
def test_the_grpo_variants_train_on_the_tiny_chain(chain, tmp_path, name):
    run = run_stage(name, chain["root"], f"output_dir={tmp_path}/run")
    ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in ms if "loss/policy" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss/policy"]) for m in steps)
    assert not (run / "critic").exists()
    if name == "dapo":  # dynamic sampling reports what it dropped; the batch keeps its size
        assert all("rollout/dropped_groups" in m and 1 <= m["rollout/sampling_rounds"] <= 4 for m in steps)
    with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k)  # trained away from zero


# --- the preference losses: reference-free SimPO and ORPO -----------------------------------------------------------


def pair_logps(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return -0.2 - torch.rand(5, generator=g) * 2, -0.2 - torch.rand(5, generator=g) * 2  # per-token means < 0


def test_simpo_and_orpo_match_their_formulas_and_refuse_a_reference():
    chosen, rejected = pair_logps()
    loss, _ = dpo_loss(chosen, rejected, None, None, beta=2.0, loss_type="simpo", gamma=1.0)
    expected = sum(-math.log(1 / (1 + math.exp(-(2.0 * (c - r) - 1.0)))) for c, r in zip(chosen.tolist(),
                                                                                        rejected.tolist())) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss, stats = dpo_loss(chosen, rejected, None, None, beta=0.1, loss_type="orpo")
    odds = [math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
            for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert loss.item() == pytest.approx(sum(0.1 * math.log(1 + math.exp(-o)) for o in odds) / 5, abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1 * chosen.mean().item())
    assert PREFERENCE_LOSSES["orpo"].nll_weight == 1.0 and PREFERENCE_LOSSES["simpo"].reference_free
    with pytest.raises(ValueError, match="simpo takes no reference"):
        dpo_loss(chosen, rejected, chosen, rejected, beta=2.0, loss_type="simpo")


def test_simpo_and_orpo_equal_trl_cpo_and_orpo_trainers():
    """TRL 1.16 keeps CPOTrainer and ORPOTrainer in trl.experimental: their loss methods on the same log-probs, loss
    and gradient (ORPO's NLL term is the stage's chosen-token NLL, as TRL's, and not part of this function)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    device = SimpleNamespace(device="cpu")
    chosen, rejected = pair_logps(4)
    cpo = SimpleNamespace(loss_type="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.1, alpha=0.0,
                          accelerator=device)
    orpo = SimpleNamespace(beta=0.1, accelerator=device)
    for name, trl_loss, ours in (
            ("simpo", lambda c, r: CPOTrainer.cpo_loss(cpo, c, r)[0].mean(),
             lambda c, r: dpo_loss(c, r, None, None, 2.0, "simpo", label_smoothing=0.1, gamma=1.0)[0]),
            ("orpo", lambda c, r: -ORPOTrainer.odds_ratio_loss(orpo, c, r)[0].mean(),
             lambda c, r: dpo_loss(c, r, None, None, 0.1, "orpo")[0])):
        c1, r1 = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
        c2, r2 = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
        theirs, mine = trl_loss(c1, r1), ours(c2, r2)
        assert mine.item() == pytest.approx(theirs.item(), abs=1e-5), name
        theirs.backward()
        mine.backward()
        assert torch.allclose(c1.grad, c2.grad, atol=1e-5) and torch.allclose(r1.grad, r2.grad, atol=1e-5), name


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(chain, tmp_path, monkeypatch, name):
    import stages.dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss computed reference log-probs")

    monkeypatch.setattr(stages.dpo, "reference_model", no_reference)
    monkeypatch.setattr(stages.dpo, "load_frozen", no_reference)
    run = run_stage(name, chain["root"], "lora=null", "train.log_every=1",  # full fine-tuning, yet no frozen copy
                    f"output_dir={tmp_path}/run")
    ms = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in ms if "train/loss/dpo" in m]
    assert len(train) == 4 and all(math.isfinite(m["train/loss/dpo"]) for m in train)
    assert "train/loss/sft" in train[0]  # orpo: its NLL term; simpo.yaml: dpo.sft_coef


@pytest.mark.parametrize("overrides, key, message", [
    (["dpo.reference=runs/x"], "dpo.reference", "loss_type 'simpo' is reference-free"),
    (["dpo.precompute_ref=true"], "dpo.precompute_ref", "no reference log-probs to precompute"),
    (["dpo.loss_type=kto_pairs"], "dpo.loss_type", "expected one of 'sigmoid', 'ipo', 'simpo', 'orpo'"),
])
def test_bad_preference_settings_are_one_line(chain, tmp_path, capsys, overrides, key, message):
    assert main(cli_args("simpo", chain["root"], *overrides, f"output_dir={tmp_path}/o")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ") and f": {key}: " in err and message in err, err
