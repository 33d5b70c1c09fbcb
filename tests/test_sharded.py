"""Sharded training that runs: the shipped accelerate configs (recipes/accelerate/{fsdp,zero2,zero3}.yaml) on two
CPU processes over gloo (`RLHF_CPU_SHARDING=1`), against one process with the same effective batch.

Each case asserts that the engine really ran (the manifest's `distributed_type` and `processes`, so that a
silent fallback to plain multi-process CPU fails), the same loss curve as one process (fp32), and a saved model
that plain transformers/peft loads and that gives the one-process run's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.chain import ROOT, cli_args

pytest.importorskip("deepspeed")  # `make test` installs the `deepspeed` extra: no skip there

LOSSES = {"sft": ["train/loss", "eval/loss"], "rm": ["train/loss/pairwise", "eval/loss/pairwise"],
          "dpo": ["train/loss/dpo", "eval/loss/dpo"], "grpo": ["objective/kl", "objective/score", "loss/policy"],
          "ppo": ["objective/kl", "objective/score", "loss/policy", "loss/value"]}
SHORT = {"sft": ["train.max_steps=4", "train.batch_size=16", "train.micro_batch_size=4", "train.eval_every=2",
                 "train.log_every=1", "samples=1"],
         "rm": ["train.max_steps=3", "train.epochs=1", "train.batch_size=16", "train.micro_batch_size=4",
                "train.eval_every=3", "train.log_every=1"],
         "dpo": ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=2", "train.eval_every=2",
                 "train.log_every=1"],
         # GRPO, LoRA (the reference is the sharded actor with its adapter off): rollouts generate collectively
         "grpo": ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=2", "ppo.rollout_batch_size=8",
                  "ppo.samples_per_prompt=2", "ppo.advantage_estimator=grpo", "ppo.reward_fn=gold", "ppo.kl_in=loss",
                  "generate.batch_size=16", "generate.max_new_tokens=8", "ppo.gold_every=0"],
         # PPO with a critic (a second FSDP module, prepared on its own) and the reward model, replicated
         "ppo": ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=2", "ppo.rollout_batch_size=16",
                 "generate.batch_size=16", "generate.max_new_tokens=8", "ppo.gold_every=0"]}
# (accelerate config, stage, extra overrides, engine figures the manifest must record)
CASES = {
    "fsdp-sft-full": ("fsdp", "sft", ["lora=null"], {"distributed_type": "FSDP", "fsdp_version": 2}),
    "fsdp-dpo-lora": ("fsdp", "dpo", [], {"distributed_type": "FSDP", "fsdp_version": 2}),
    "zero2-sft-lora": ("zero2", "sft", [], {"distributed_type": "DEEPSPEED", "zero_stage": 2}),
    "zero3-sft-lora": ("zero3", "sft", [], {"distributed_type": "DEEPSPEED", "zero_stage": 3}),
    "zero3-rm-full": ("zero3", "rm", [], {"distributed_type": "DEEPSPEED", "zero_stage": 3}),
    "fsdp-grpo-lora": ("fsdp", "grpo", [], {"distributed_type": "FSDP", "fsdp_version": 2}),
    "fsdp-ppo-critic": ("fsdp", "ppo", [], {"distributed_type": "FSDP", "fsdp_version": 2}),
}


def launch(args: list[str], config: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RLHF_CPU_SHARDING": "1"}
    if config is None:
        cmd = [sys.executable, "-m", "rlhf.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def losses(run: Path, keys: list[str]) -> dict[tuple[int, str], float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.update({(m["step"], k): m[k] for k in keys if m.get(k) is not None})
    return out


def plain_logits(folder: Path) -> torch.Tensor:
    """The saved model loaded as a user would (transformers, plus peft for an adapter), on a fixed probe."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    ids = torch.arange(3, 15).unsqueeze(0)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    else:
        seq_cls = (AutoConfig.from_pretrained(str(folder)).architectures or [""])[0].endswith("Classification")
        model = (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_pretrained(str(folder))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def one_process(chain, tmp_path_factory):
    """One-process runs, each made once per (stage, overrides) and shared by the cases that compare with it."""
    runs: dict[tuple, Path] = {}

    def get(stage: str, extra: list[str]) -> Path:
        key = (stage, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp("one") / stage
            done = launch(cli_args(stage, chain["root"], *SHORT[stage], *extra, f"output_dir={out}"), None)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[key] = out
        return runs[key]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_run_matches_one_process(chain, one_process, tmp_path, case):
    config, stage, extra, engine = CASES[case]
    out = tmp_path / case
    done = launch(cli_args(stage, chain["root"], *SHORT[stage], *extra, f"output_dir={out}"), config)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["derived"]["processes"] == 2
    assert {k: manifest["derived"].get(k) for k in engine} == engine  # no silent fallback to MULTI_CPU
    assert engine["distributed_type"] in done.stdout + done.stderr  # the start line says what runs

    single = one_process(stage, extra)
    one, two = losses(single, LOSSES[stage]), losses(out, LOSSES[stage])
    assert one.keys() == two.keys() and len(one) >= 3
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-3), key
    assert torch.allclose(plain_logits(out / "model"), plain_logits(single / "model"), rtol=1e-3, atol=1e-4)
    # parameter counts are the full model's, also where ZeRO-3 holds a partition per process
    if "parameters" in manifest:
        assert manifest["parameters"] == json.loads((single / "manifest.json").read_text())["parameters"]


def test_deepspeed_config_takes_the_recipes_batch_and_rejects_a_contradiction():
    from rlhf.errors import RecipeError
    from rlhf.runtime import fit_deepspeed
    from rlhf.sections import TrainSection

    train = TrainSection(batch_size=16, micro_batch_size=4, max_grad_norm=0.5)
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    fit_deepspeed(config, train, 2)
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
                      "gradient_clipping": 0.5}
    for key, value in (("gradient_accumulation_steps", 4), ("train_micro_batch_size_per_gpu", 8),
                       ("train_batch_size", 16)):
        with pytest.raises(RecipeError) as err:
            fit_deepspeed({key: value}, train, 2)
        assert err.value.key == f"deepspeed_config.{key}" and "\n" not in err.value.line()
