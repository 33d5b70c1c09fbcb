"""Critic-free RL in the PPO engine (GRPO, RLOO, REINFORCE++) and reward functions (verifiable rewards)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.rewards import call_reward_fn, check_records, gold_reward, load_reward_fn
from tests.chain import cli_args, run_stage


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- reward functions ---------------------------------------------------------------------------------------------


def test_gold_reward_grades_the_task_suite_answer():
    records = [{"task": "reverse", "answer": "b a"}, {"task": "max", "answer": "c"}]
    assert gold_reward(["p", "q"], [" b a", "d"], records) == [1.0, 0.0]
    with pytest.raises(UserError, match="ppo.reward_fn: 'gold' needs .* 1 of 2 have none"):
        check_records("gold", [{"task": "max", "answer": "c"}, {"prompt": "hello"}])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, records):\n    return [float(len(c)) for c in completions]\n"
        "def short(prompts, completions, records):\n    return [1.0]\n"
        "def nan(prompts, completions, records):\n    return [float('nan')] * len(completions)\n")
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_user_reward_functions_are_checked(user_module):
    fn = load_reward_fn("my_rewards:length")
    assert call_reward_fn(fn, ["p", "p"], ["ab", "abcd"], [{}, {}]).tolist() == [2.0, 4.0]
    problems = {"my_rewards": "expected 'gold' or 'package.module:function'",
                "my_rewards:missing": "module 'my_rewards' has no function 'missing'",
                "broken_rewards:f": "cannot import 'broken_rewards': ModuleNotFoundError",
                "nowhere_at_all:f": "cannot import 'nowhere_at_all'"}
    for spec, message in problems.items():
        with pytest.raises(UserError, match=message) as err:
            load_reward_fn(spec)
        assert err.value.key == "ppo.reward_fn"
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        call_reward_fn(load_reward_fn("my_rewards:short"), ["p", "p"], ["a", "b"], [{}, {}])
    with pytest.raises(UserError, match="returned a non-finite value"):
        call_reward_fn(load_reward_fn("my_rewards:nan"), ["p"], ["a"], [{}])


@pytest.mark.parametrize("spec, message, when", [
    ("broken_rewards:f", "cannot import 'broken_rewards'", "before"),
    ("my_rewards:short", "returned 1 values for", "first rollout"),
    ("my_rewards:nan", "returned a non-finite value", "first rollout"),
])
def test_a_bad_reward_function_is_one_line_and_exit_2(chain, tmp_path, capsys, user_module, spec, message, when):
    args = cli_args("ppo", chain["root"], f"ppo.reward_fn={spec}", "ppo.gold_every=0", f"output_dir={tmp_path}/out")
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert lines == [lines[0]] and lines[0].startswith("error: ppo.reward_fn: ") and message in lines[0]
    if when == "before":  # before any model was loaded: the role report was never printed
        assert "ppo roles on" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --- recipes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key, message", [
    (["ppo.advantage_estimator=grpo"], "ppo.samples_per_prompt", "needs at least 2, got 1"),
    (["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=1"], "ppo.samples_per_prompt", "needs at least 2"),
    (["ppo.reward_model=null"], "ppo.reward_model", "give ppo.reward_model, ppo.reward_fn or both"),
    (["ppo.reward_model=null", "ppo.reward_fn=gold"], "ppo.critic_init", "no reward model to start the critic"),
    (["ppo.reward_weights={reward_model: 1.0, gold: 2.0}"], "ppo.reward_weights", "got 'gold'"),
    (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=3", "train.batch_size=32"], "ppo.rollout_batch_size",
     "16 prompts x 3 samples is not a multiple"),
])
def test_estimator_and_reward_recipes_are_checked(chain, tmp_path, capsys, overrides, key, message):
    assert main(cli_args("ppo", chain["root"], *overrides, f"output_dir={tmp_path}/out")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ") and f": {key}: " in err and message in err, err


# --- stage runs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator, extra", [
    ("grpo", ["ppo.samples_per_prompt=2", "ppo.kl_in=loss"]),
    ("rloo", ["ppo.samples_per_prompt=4", "ppo.loss_agg=sequence"]),
    ("reinforce_pp", []),
])
def test_critic_free_runs_hold_no_critic(chain, tmp_path, capsys, estimator, extra):
    """gold rewards, no reward model: three roles (two under LoRA), nothing of a critic built or saved."""
    run = run_stage("ppo", chain["root"], f"ppo.advantage_estimator={estimator}", "ppo.reward_fn=gold",
                    "ppo.reward_model=null", "train.max_steps=2", "ppo.gold_every=1", *extra,
                    f"output_dir={tmp_path}/run")
    err = capsys.readouterr().err
    report = err[err.index("ppo roles on"):].splitlines()[:4]
    assert [line.split()[0] for line in report[1:3]] == ["actor", "reference"] and "critic" not in report[3]
    assert not (run / "critic").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rewards"] == {"advantage_estimator": estimator, "reward_model": None, "reward_fn": "gold",
                                   "reward_weights": {"reward_model": 1.0, "reward_fn": 1.0}}
    assert "critic_info" not in manifest and manifest["reward_stats"] is None
    ms = [m for m in metrics(run) if "objective/score" in m]
    assert [m["step"] for m in ms] == [1, 2] and all(0 <= m["objective/score"] <= 1 for m in ms)  # gold: 0 or 1
    assert not any(k.startswith("value/") or k == "critic/grad_norm" for m in ms for k in m)
    assert all(math.isfinite(m["loss/policy"]) for m in ms)
    assert ("loss/kl" in ms[0]) == ("ppo.kl_in=loss" in extra)
    if "ppo.kl_in=loss" in extra:
        assert ms[0]["objective/non_score_reward"] == 0  # the KL is in the loss, not in the reward
    gold = [m for m in metrics(run) if "gold/accuracy" in m]
    assert gold and "gold/proxy_score" not in gold[-1]  # no reward model: no proxy to compare


def test_reward_model_and_function_together(chain, tmp_path):
    run = run_stage("ppo", chain["root"], "ppo.reward_fn=gold",
                    "ppo.reward_weights={reward_model: 0.5, reward_fn: 2.0}", "train.max_steps=1", "ppo.gold_every=0",
                    f"output_dir={tmp_path}/run")
    (m,) = [m for m in metrics(run) if "objective/score" in m]
    assert 0 <= m["objective/reward_fn"] <= 1
    assert m["objective/score"] == pytest.approx(0.5 * m["objective/reward_model"] + 2.0 * m["objective/reward_fn"],
                                                 abs=1e-5)
    assert (run / "critic").is_dir()  # gae: the critic starts from the reward model
