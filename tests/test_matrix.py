"""The architecture matrix: for each family of `tests.families` (a tiny random model with the tokenizer, chat
template, stop tokens and pad of the instruct model it stands for), `rlhf check` -> sft (LoRA all-linear, the
family's chat template) -> rm -> ppo (2 iterations) -> dpo -> export with its parity check, on the task suite
written as conversations.

The whole matrix costs about 10 s of CPU (tiny models, a few steps per stage), so every family runs in
`make test`; `make test-matrix` runs it alone.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_formats import tasks
from rlhf.check import main as check_main
from rlhf.models import load_model
from rlhf.recipes import load_recipe
from rlhf.sections import TaskSuiteSection
from tests.conftest import write_jsonl, write_yaml
from tests.families import FAMILIES, build

@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """The task suite as conversations (small), and its corpus for the tokenizers."""
    root = tmp_path_factory.mktemp("suite")
    data = tasks.as_conversations(tasks.generate(TaskSuiteSection(
        sft_records=64, preference_records=64, prompt_records=32, eval_records=16, corpus_documents=400), seed=0))
    files = {name: write_jsonl(root / f"{name}.jsonl", rows) for name, rows in data.items() if name != "corpus"}
    return {"corpus": data["corpus"], **{name: str(path) for name, path in files.items()}}


def recipes(family: str, model: Path, suite: dict, root: Path) -> dict[str, Path]:
    """The chain's recipes for one family, written into `root`."""
    spec = FAMILIES[family]
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    train = {"batch_size": 8, "micro_batch_size": 4, "lr": 1.0e-3, "warmup_ratio": 0.0, "save_every": 0}
    pairs = {"train": suite["prefs"], "eval": suite["prefs_eval"], "template": "chat", "max_len": 96,
             "max_prompt_len": 64}
    run = {name: str(root / name) for name in ("sft", "rm", "ppo", "dpo", "export")}
    out = {
        "sft": {"stage": "sft", "output_dir": run["sft"],
                "model": {"name_or_path": str(model), "chat_template": spec.chat_template}, "lora": lora,
                "data": {"train": suite["sft"], "eval": suite["sft_eval"], "template": "chat", "max_len": 96},
                "train": {**train, "max_steps": 3}, "generate": {"max_new_tokens": 6, "temperature": 0.0},
                "samples": 2},
        "rm": {"stage": "rm", "output_dir": run["rm"], "model": {"name_or_path": run["sft"]}, "lora": lora,
               "data": pairs, "train": {**train, "max_steps": 3}},
        "ppo": {"stage": "ppo", "output_dir": run["ppo"], "model": {"name_or_path": run["sft"]}, "lora": lora,
                "data": {"train": suite["prompts"], "template": "chat", "max_prompt_len": 64},
                "generate": {"max_new_tokens": 8, "batch_size": 8}, "train": {**train, "max_steps": 2},
                "ppo": {"reward_model": run["rm"], "rollout_batch_size": 8, "ppo_epochs": 1}},
        "dpo": {"stage": "dpo", "output_dir": run["dpo"], "model": {"name_or_path": run["sft"]}, "lora": lora,
                "data": pairs, "train": {**train, "max_steps": 2}},
        "export": {"stage": "export", "output_dir": run["export"], "source": run["ppo"],
                   "export": {"dtype": "float32", "parity_count": 2, "parity_new_tokens": 4}},
    }
    return {stage: write_yaml(root / "recipes" / f"{stage}.yaml", data) for stage, data in out.items()}


def run_stage(path: Path) -> Path:
    recipe = load_recipe(path)
    return importlib.import_module(f"stages.{recipe.stage}").run(recipe)


def stop_tokens(folder: Path) -> list[str]:
    """The stop tokens a saved generation config lists."""
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    ids = eos if isinstance(eos, list) else [eos]
    return AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens(ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_chain(family, suite, tmp_path, capsys):
    spec = FAMILIES[family]
    model = build(family, tmp_path / "base", suite["corpus"])
    paths = recipes(family, model, suite, tmp_path)

    assert check_main([str(paths["sft"])]) == 0
    out = capsys.readouterr().out
    assert f"pad {spec.expected_pad!r}" in out and f"stop tokens {list(spec.expected_stops)}" in out
    assert "ends the labels of" in out and out.rstrip().endswith("ready")

    sft = run_stage(paths["sft"])
    saved = AutoTokenizer.from_pretrained(sft / "model")
    assert saved.pad_token == spec.expected_pad and saved.chat_template
    assert stop_tokens(sft / "model") == list(spec.expected_stops)  # the whole list, not EOS alone
    assert load_model(str(sft)).get_input_embeddings().weight.shape[0] == len(saved)

    rm = run_stage(paths["rm"])
    assert json.loads((rm / "reward_stats.json").read_text())["std"] > 0
    ppo = run_stage(paths["ppo"])
    metrics = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    iterations = [m for m in metrics if "objective/score" in m]
    assert len(iterations) == 2 and all(torch.isfinite(torch.tensor(m["loss/policy"])) for m in iterations)
    dpo = run_stage(paths["dpo"])
    assert (dpo / "model" / "adapter_model.safetensors").is_file()

    export = run_stage(paths["export"])
    parity = json.loads((export / "manifest.json").read_text())["parity"]
    assert parity["merge_fp32"]["logits_ok"] and parity["merge_fp32"]["greedy_match"] == 1.0
    assert stop_tokens(export / "model") == list(spec.expected_stops)
    merged = AutoModelForCausalLM.from_pretrained(export / "model")
    assert merged.generation_config.pad_token_id == saved.pad_token_id
    start = load_model(str(sft))  # PPO moved the policy away from the SFT model
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), start.state_dict().values()))
    assert AutoTokenizer.from_pretrained(export / "model").chat_template == saved.chat_template
    card = (export / "model" / "README.md").read_text()
    assert "## Prompt format" in card and all(f"`{t}`" in card for t in spec.expected_stops)
