"""The memory planner's arithmetic against hand-computed figures and real parameter counts."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.plan import (GiB, OVERHEAD, activation_bytes, lora_params, model_shape, parse_bytes, plan,
                       role_bytes, shipped_config)
from rlhf.recipes import load_recipe
from rlhf.sections import LoraSection
from tests.conftest import ROOT, rlhf, write_yaml
from tests.families import write_hub_cache


def config(tied=True, kv=2):
    return LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied, kv", [(True, 2), (False, 4), (True, 1)])
def test_parameter_count_matches_the_real_model(tied, kv):
    c = config(tied, kv)
    assert model_shape(c)["n_params"] == sum(p.numel() for p in LlamaForCausalLM(c).parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_count_matches_peft(targets):
    c = config()
    peft_model = get_peft_model(LlamaForCausalLM(c), LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(model_shape(c), 8, targets) == trainable


def test_full_and_lora_bytes_by_hand():
    shape = model_shape(config())
    n = shape["n_params"]
    full = role_bytes(shape, 2, trainable=True, rows=1, seq=1)
    assert (full["weights"], full["gradients"], full["optimizer"]) == (2 * n, 2 * n, 4 * n)
    lora = LoraSection(r=8, target_modules=["q_proj", "v_proj"])
    extra = 2 * 8 * ((64 + 64) + (64 + 32))  # two layers, q: 64->64, v: 64->2*16
    adapted = role_bytes(shape, 2, trainable=True, lora=lora, rows=1, seq=1)
    assert (adapted["weights"], adapted["gradients"], adapted["optimizer"]) == (2 * n + 4 * extra, 4 * extra,
                                                                                8 * extra)
    frozen = role_bytes(shape, 2, trainable=False)
    assert frozen["total"] == 2 * n
    assert role_bytes(shape, 2, trainable=False, shared=True)["total"] == 0


def test_zero_stages_shard_the_states():
    shape = model_shape(config())
    n = shape["n_params"]
    z3 = role_bytes(shape, 4, trainable=True, rows=1, seq=1, zero=3, gpus=4)
    assert (z3["weights"], z3["gradients"], z3["optimizer"]) == (4 * n // 4, 4 * n // 4, 8 * n // 4)
    z1 = role_bytes(shape, 4, trainable=True, rows=1, seq=1, zero=1, gpus=4)
    assert (z1["weights"], z1["gradients"], z1["optimizer"]) == (4 * n, 4 * n, 8 * n // 4)


def test_activations_and_kv_cache_by_hand():
    shape = model_shape(config())  # h 64, i 128, kv 2 x d 16, 2 layers, vocab 100
    per_token_layer = 8 * 64 + 2 * 2 * 16 + 4 * 128
    assert activation_bytes(shape, 3, 10, 2, False) == 30 * 2 * per_token_layer * 2 + 2 * 30 * 100 * 4
    assert activation_bytes(shape, 3, 10, 2, True) == 30 * (2 * 64 + per_token_layer) * 2 + 2 * 30 * 100 * 4


def test_plan_for_ppo_recipe_and_fit(tmp_path):
    shape = model_shape(config())
    data = {"stage": "ppo", "output_dir": "o", "model": {"name_or_path": "m", "dtype": "bfloat16"},
            "data": {"train": "p.jsonl", "max_prompt_len": 20}, "generate": {"max_new_tokens": 12, "batch_size": 8},
            "train": {"batch_size": 8, "micro_batch_size": 4, "mixed_precision": "bf16"},
            "ppo": {"reward_model": "r", "rollout_batch_size": 16}}
    recipe = load_recipe(write_yaml(tmp_path / "ppo.yaml", data))
    result = plan(recipe, {"policy": shape, "reward": shape}, gpu_mem=80 * GiB)
    assert set(result["roles"]) == {"actor", "reference", "critic", "reward"}
    assert result["roles"]["reference"]["total"] == 0  # the adapter-disabled actor
    assert result["roles"]["actor"]["kv_cache"] == 2 * 2 * 2 * 16 * 32 * 8 * 2
    assert result["roles"]["reward"]["total"] == 2 * shape["n_params"]
    assert result["per_device"] == sum(r["total"] for r in result["roles"].values()) + OVERHEAD
    assert result["fits"] is True
    assert plan(recipe, {"policy": shape, "reward": shape}, gpu_mem=result["per_device"] - 1)["fits"] is False


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("24GB") == 24 * 10 ** 9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2 ** 20)
    assert parse_bytes("1000") == 1000
    with pytest.raises(UserError, match="--gpu-mem"):
        parse_bytes("lots")


def test_plan_cli_on_a_local_model(tmp_path, capsys):
    config().save_pretrained(tmp_path / "model")
    recipe = write_yaml(tmp_path / "sft.yaml", {"stage": "sft", "output_dir": "o",
                                                 "model": {"name_or_path": str(tmp_path / "model")},
                                                 "data": {"train": "t.jsonl"}})
    assert main(["plan", str(recipe), "--gpu-mem", "80GiB"]) == 0
    assert "per device:" in capsys.readouterr().out
    assert main(["plan", str(recipe), "model.name_or_path=./missing"]) == 2
    assert "model path ./missing not found" in capsys.readouterr().err


def test_qwen2_parameter_count_includes_its_qkv_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True)
    assert model_shape(c)["n_params"] == sum(p.numel() for p in Qwen2ForCausalLM(c).parameters())


@pytest.mark.parametrize("hub_id, params", [("Qwen/Qwen2.5-0.5B", 494_032_768),
                                            ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
                                            ("huggyllama/llama-7b", 6_738_415_616)])
def test_shipped_configs_have_the_published_sizes(hub_id, params):
    assert model_shape(shipped_config(hub_id))["n_params"] == params


@pytest.mark.parametrize("recipe, base", [("recipes/reproduce/hh_ppo.yaml", "Qwen/Qwen2.5-0.5B"),
                                          ("recipes/hub/ppo.yaml", "Qwen/Qwen2.5-0.5B-Instruct")])
def test_plan_works_before_anything_has_run(tmp_path, recipe, base):
    """The README's example on a fresh checkout, offline: the recipe names run folders that do not exist yet; they
    are followed through the recipes next to it back to the base model, whose shipped config is read."""
    assert not (ROOT / "runs" / "reproduce" / "hh" / "sft").exists()
    done = rlhf("plan", recipe, "--gpu-mem", "80GiB", env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    sft = recipe.rsplit("/", 1)[0] + ("/hh_sft.yaml" if "reproduce" in recipe else "/sft.yaml")
    assert f"written by {sft} <- {base}: the shipped copy of its config" in done.stdout
    assert "reward model:" in done.stdout and "critic" in done.stdout and "fits" in done.stdout


def test_plan_prefers_the_hub_cache_and_takes_model(tmp_path):
    home, folder = tmp_path / "hf", tmp_path / "model"
    config(tied=False).save_pretrained(folder)
    write_hub_cache(home, "Qwen/Qwen2.5-0.5B", folder)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = rlhf("plan", "recipes/reproduce/hh_sft.yaml", env=env)
    assert done.returncode == 0 and "Qwen/Qwen2.5-0.5B: its config.json" in done.stdout, done.stderr
    n = model_shape(config(tied=False))["n_params"]
    done = rlhf("plan", "recipes/reproduce/hh_ppo.yaml", "--model", str(folder), env=env)
    assert done.returncode == 0 and f"reward model: {folder}: its config.json" in done.stdout, done.stderr
    assert f"{2 * n / GiB:10.3f}" in done.stdout  # the reward model's bf16 weights, from the config given
