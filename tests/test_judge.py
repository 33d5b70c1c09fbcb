"""Judged win rates: the pure math against hand computations and a plain loop, `eval` with a judge on the test
chain (task suite and prompt-only prompts), and the report's win-rate table and KL-reward frontier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.data import read_prompts
from rlhf.errors import RecipeError
from rlhf.report import build_report
from rlhf.stats import LOSS, TIE, WIN, outcomes, win_rates
from tests.chain import recipe, run_stage
from tests.conftest import write_jsonl
from tests.test_report import fake_run


def test_outcomes_and_rates_by_hand():
    model, baseline = [3.0, 1.0, 2.0, 5.0, 0.0], [1.0, 1.0, 3.0, 2.0, 0.05]
    # differences 2, 0, -1, 3, -0.05 with a tie margin of 0.1
    assert outcomes(model, baseline, 0.1).tolist() == [WIN, TIE, LOSS, WIN, TIE]
    assert outcomes(model, baseline).tolist() == [WIN, TIE, LOSS, WIN, LOSS]  # margin 0: only equal scores tie
    r = win_rates(model, baseline, 0.1, n_boot=50)
    assert (r["win"], r["tie"], r["loss"], r["prompts"]) == (0.4, 0.4, 0.2, 5)
    same = [False, False, False, True, False]  # identical responses tie whatever their scores
    r = win_rates(model, baseline, 0.1, n_boot=50, same=same)
    assert (r["win"], r["tie"], r["loss"]) == (0.2, 0.6, 0.2)
    for name in ("win", "tie", "loss"):
        lo, hi = r[f"{name}_ci"]
        assert 0 <= lo <= r[name] <= hi <= 1
    sure = win_rates([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert sure["win_ci"] == [1.0, 1.0] and sure["loss_ci"] == [0.0, 0.0]  # every resample wins everything
    assert win_rates([], [])["win"] is None


def test_bootstrap_interval_matches_a_plain_loop():
    g = torch.Generator().manual_seed(1)
    n, n_boot, seed = 37, 200, 3
    model, baseline = torch.randn(n, generator=g).tolist(), torch.randn(n, generator=g).tolist()
    r = win_rates(model, baseline, 0.2, n_boot=n_boot, seed=seed)

    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed)).tolist()  # the same draws
    for name, value in (("win", WIN), ("tie", TIE), ("loss", LOSS)):
        o = [WIN if m > b + 0.2 else LOSS if m < b - 0.2 else TIE for m, b in zip(model, baseline)]
        rates = sorted(sum(o[i] == value for i in row) / n for row in idx)
        bounds = []
        for q in (0.025, 0.975):  # the percentile with linear interpolation between order statistics
            pos = q * (n_boot - 1)
            lo = math.floor(pos)
            bounds.append(rates[lo] + (pos - lo) * (rates[min(lo + 1, n_boot - 1)] - rates[lo]))
        assert r[name] == pytest.approx(sum(x == value for x in o) / n)
        assert r[f"{name}_ci"] == pytest.approx(bounds)


def test_eval_judges_every_model_against_the_baseline(chain, tmp_path, capsys):
    models = f"eval.models={{base: {chain['pretrain']}, sft: {chain['sft']}}}"
    ev = run_stage("eval", chain["root"], models, f"eval.judge={chain['rm']}", "eval.baseline=sft", "eval.greedy=false",
                   "eval.bootstrap=200", f"output_dir={tmp_path}/eval")
    out = json.loads((ev / "eval.json").read_text())
    judge = out["judge"]
    assert judge["baseline"] == "sft" and judge["model"] == str(chain["rm"])
    (c,) = judge["comparisons"]
    assert c["model"] == "base" and c["prompts"] == 16
    assert c["win"] + c["tie"] + c["loss"] == pytest.approx(1.0)
    assert c["win_ci"][0] <= c["win"] <= c["win_ci"][1]
    assert c["length_chars"] > 0 and c["baseline_length_chars"] > 0
    results = {r["model"]: r for r in out["results"]}
    assert c["gold_accuracy"] == results["base"]["gold_accuracy"] is not None
    assert len(results["sft"]["judge_scores"]) == 16
    # the judge is the reward model here: the same scores as the RM column
    assert results["sft"]["judge_score"] == pytest.approx(results["sft"]["reward_score"])
    printed = capsys.readouterr().out
    assert "judge base vs sft: win " in printed and "gold " in printed.split("judge base vs sft")[1]
    assert "## Judged win rates against sft" in (ev / "eval.md").read_text()
    manifest = json.loads((ev / "manifest.json").read_text())
    assert manifest["metrics"]["base/judge_win"] == c["win"] and "judge_scores" not in manifest["results"][0]


def test_eval_judges_prompt_only_files(chain, tmp_path):
    # plain {"prompt"} records: no gold answer, yet the judge compares the models
    records = read_prompts(str(chain["tasks"] / "eval_prompts.jsonl"), "eval.prompts", 0, "plain")[:16]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r.prompt} for r in records])
    ev = run_stage("eval", chain["root"], f"eval.models={{sft: {chain['sft']}, base: {chain['pretrain']}}}",
                   f"eval.prompts={prompts}", f"eval.judge={chain['rm']}", "eval.reward_model=null",
                   "eval.bootstrap=100", f"output_dir={tmp_path}/eval")
    out = json.loads((ev / "eval.json").read_text())
    (c,) = out["judge"]["comparisons"]
    assert (c["model"], c["baseline"]) == ("base", "sft")  # the first listed is the default baseline
    assert c["gold_accuracy"] is None and c["prompts"] == 16 and c["win"] is not None
    assert all(r["reward_score"] is None and r["judge_score"] is not None for r in out["results"])


def test_the_baseline_must_be_an_evaluated_model(chain):
    with pytest.raises(RecipeError, match="eval.baseline: expected one of the names in eval.models"):
        recipe("eval", chain["root"], "eval.baseline=nobody")


@pytest.fixture
def judged_eval(tmp_path):
    root = tmp_path / "runs"
    ev = fake_run(root / "eval", "eval", [])
    result = {"gold_accuracy_greedy": None, "response_length": 4.0, "eos_rate": 1.0}
    (ev / "eval.json").write_text(json.dumps({
        "results": [{**result, "model": "sft", "gold_accuracy": 0.6, "reward_score": 1.0, "kl_to_reference": 0.0},
                    {**result, "model": "ppo", "gold_accuracy": 0.8, "reward_score": 2.0, "kl_to_reference": 0.3},
                    {**result, "model": "dpo", "gold_accuracy": 0.9, "reward_score": 2.5, "kl_to_reference": 0.9},
                    {**result, "model": "other", "gold_accuracy": 0.1, "reward_score": 0.5, "kl_to_reference": None}],
        "judge": {"model": "runs/rm", "baseline": "sft", "tie_margin": 0.0, "bootstrap": 100, "comparisons": [
            {"model": m, "baseline": "sft", "win": w, "tie": 0.1, "loss": 0.9 - w, "win_ci": [w - 0.1, w + 0.1],
             "length_chars": 9.0, "baseline_length_chars": 8.0, "gold_accuracy": g, "baseline_gold_accuracy": 0.6}
            for m, w, g in (("ppo", 0.55, 0.8), ("dpo", 0.7, 0.9))]}}))
    return root


def test_report_has_the_win_rates_and_the_frontier(judged_eval, tmp_path):
    text = build_report([judged_eval], tmp_path / "out").read_text()
    assert "Judged win rates against sft (judge: runs/rm)" in text
    assert "| ppo | sft | 55.0% | 45.0%–65.0% | 10.0% | 35.0% | 9.0 | 8.0 | 80.0% | 60.0% |" in text
    png = tmp_path / "out" / "frontier-eval.png"
    data = png.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 5000 and "](frontier-eval.png)" in text
    page = (tmp_path / "out" / "index.html").read_text()
    assert 'src="frontier-eval.png"' in page and "Judged win rates against sft" in page


def test_report_without_kl_skips_the_frontier(judged_eval, tmp_path):
    evaluation = json.loads((judged_eval / "eval" / "eval.json").read_text())
    for r in evaluation["results"]:
        r["kl_to_reference"] = None  # e.g. no eval.reference: no frontier, the win rates still
    (judged_eval / "eval" / "eval.json").write_text(json.dumps(evaluation))
    text = build_report([judged_eval], tmp_path / "out").read_text()
    assert "| dpo | sft | 70.0% |" in text and not list((tmp_path / "out").glob("*.png"))
    del evaluation["judge"]  # an eval without a judge: its table alone
    (judged_eval / "eval" / "eval.json").write_text(json.dumps(evaluation))
    text = build_report([judged_eval], tmp_path / "out2").read_text()
    assert "| dpo | 90.0% |" in text and "Judged" not in text
