"""One process vs two (`accelerate launch --multi_gpu --num_processes 2` on CPU, gloo): the same loss curves.

The global batch is the same in both runs (per-process micro-batches halve), every loss is a token-
(or pair-) weighted mean over the whole global batch, and PPO samples with per-prompt seeded noise, so
the curves agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chain import ROOT, cli_args

COMPARED = {
    "sft": ["train/loss", "eval/loss"],
    "rm": ["train/loss/pairwise", "train/rewards/accuracy", "eval/loss/pairwise"],
    "dpo": ["train/loss/dpo", "train/rewards/margin", "eval/loss/dpo"],
    "ppo": ["objective/score", "objective/kl", "loss/policy", "loss/value", "policy/approx_kl", "gold/accuracy",
            "gold/proxy_score"],
    "grpo": ["objective/score", "objective/reward_fn", "objective/kl", "loss/policy", "loss/kl", "policy/approx_kl",
             "gold/accuracy"],
}
EXTRA = {
    "sft": ["train.max_steps=6", "train.batch_size=16", "train.micro_batch_size=4", "train.eval_every=3",
            "train.log_every=1"],
    "rm": ["train.max_steps=6", "train.batch_size=16", "train.micro_batch_size=4", "train.eval_every=3",
           "train.log_every=1"],
    "dpo": ["train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=2", "train.eval_every=2",
            "train.log_every=1"],
    "ppo": ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2", "ppo.rollout_batch_size=16",
            "ppo.gold_every=1", "ppo.gold_count=7"],  # 7 gold prompts: shards of 4 and 3 on two processes
    # GRPO with the reward model and gold rewards: each process samples its prompts' groups of 2 (keys per prompt
    # and sample), the whole rollout is the same for 1 and 2 processes
    "grpo": ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2", "ppo.rollout_batch_size=8",
             "ppo.samples_per_prompt=2", "ppo.advantage_estimator=grpo", "ppo.reward_fn=gold", "ppo.kl_in=loss",
             "ppo.gold_every=1", "ppo.gold_count=7"],
}
STAGE = {"grpo": "ppo"}


def launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "rlhf.cli", *args]
    else:
        # without CUDA, rlhf's accelerator runs these as CPU processes over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def curve(run: Path, keys: list[str]) -> dict[tuple[int, str], float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for k in keys:
            if m.get(k) is not None:
                out[(m["step"], k)] = m[k]
    return out


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_one_and_two_processes_give_the_same_curves(chain, tmp_path, stage):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        done = launch(cli_args(STAGE.get(stage, stage), chain["root"], *EXTRA[stage], f"output_dir={out}"), n)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = out
    one, two = curve(runs[1], COMPARED[stage]), curve(runs[2], COMPARED[stage])
    assert one.keys() == two.keys() and len(one) >= 3
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # only the main process wrote: one line per logged step, one event file, the derived figures say 2
    lines = (runs[2] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((runs[1] / "metrics.jsonl").read_text().splitlines())
    (project,) = (runs[2] / "tb").iterdir()  # tb/<project>/ (rlhf.tracking)
    assert len(list(project.glob("events.out.tfevents.*"))) == 1
    manifest = json.loads((runs[2] / "manifest.json").read_text())
    assert manifest["derived"]["processes"] == 2
