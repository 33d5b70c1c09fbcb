"""Every recipe in recipes/reproduce/ dry-runs against a tiny stand-in model and a few records in the
same formats (Alpaca JSON list, Anthropic HH-RLHF transcripts), so a format or key drift breaks CI."""

from __future__ import annotations

import json

import pytest

from rlhf.recipes import load_recipe
from tests.chain import ROOT
from tests.conftest import write_jsonl

REPRO = ROOT / "recipes" / "reproduce"
SMALL = ["train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_every=0",
         "train.save_every=0", "model.dtype=float32"]


def hh_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        prefix = f"\n\nHuman: What is {i} plus {i}?\n\nAssistant: Let me think.\n\nHuman: Go on.\n\nAssistant:"
        rows.append({"chosen": prefix + f" It is {2 * i}.", "rejected": prefix + f" It is {2 * i + 1}, I think."})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    alpaca = [{"instruction": f"Write the number {i} in words.", "input": "" if i % 2 else f"n={i}",
               "output": f"The number is {i}."} for i in range(24)]
    (root / "alpaca_data.json").write_text(json.dumps(alpaca, indent=2))  # a JSON list, like the original
    write_jsonl(root / "hh_train.jsonl", hh_rows(24))
    write_jsonl(root / "hh_test.jsonl", hh_rows(30)[24:])
    return root


def run(name: str, *overrides: str):
    recipe = load_recipe(REPRO / f"{name}.yaml", None, SMALL + list(overrides))
    import importlib

    return importlib.import_module(f"stages.{recipe.stage}").run(recipe)


def test_alpaca_lora_recipe(chain, data, tmp_path):
    out = run("alpaca_lora_sft", f"model.name_or_path={chain['pretrain']}", f"data.train={data}/alpaca_data.json",
              f"output_dir={tmp_path}/alpaca", "samples=1", "generate.max_new_tokens=4")
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    assert recipe["lora"]["target_modules"] == ["q_proj", "v_proj"] and recipe["lora"]["r"] == 8
    assert recipe["data"]["template"] == "alpaca" and recipe["data"]["train_on_prompt"] is True


def test_hh_chain_recipes(chain, data, tmp_path):
    hh = [f"data.train={data}/hh_train.jsonl", f"data.eval={data}/hh_test.jsonl"]
    sft = run("hh_sft", f"model.name_or_path={chain['pretrain']}", *hh, f"output_dir={tmp_path}/sft",
              "generate.max_new_tokens=4")
    rm = run("hh_rm", f"model.name_or_path={sft}", *hh, f"output_dir={tmp_path}/rm")
    ppo = run("hh_ppo", f"model.name_or_path={sft}", f"ppo.reward_model={rm}", f"data.train={data}/hh_train.jsonl",
              f"output_dir={tmp_path}/ppo", "ppo.rollout_batch_size=4", "generate.max_new_tokens=4",
              "generate.batch_size=4")
    dpo = run("hh_dpo", f"model.name_or_path={sft}", *hh, f"output_dir={tmp_path}/dpo")
    for out in (sft, rm, ppo, dpo):
        assert (out / "manifest.json").is_file() and (out / "model").is_dir()
    assert (dpo / "ref_logps.safetensors").is_file()  # the recipe precomputes the reference
    prompt = json.loads((sft / "manifest.json").read_text())["data"]
    assert prompt["train_records"] == 24
