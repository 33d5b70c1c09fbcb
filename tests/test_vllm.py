"""The vLLM rollout engine (`generate.engine: vllm`, issue 26).

Pure parts run everywhere: the truncated-importance-sampling weights against a loop, the policy's effective
weights under LoRA (+ trainable token rows, tied embeddings) against the adapted model, recipe errors. The engine
itself runs where vLLM is importable (`make test-vllm`, in .venv-vllm): greedy equality with the seeded engine,
log-prob agreement after every sync, batch-order independence, and PPO stage runs (LoRA GRPO on Llama, full
fine-tuning on Qwen2 with TIS) whose sampler/trainer log-prob difference stays under 1e-4 at every iteration.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math

import pytest
import torch

from rlhf.errors import UserError
from rlhf.losses import truncated_importance_weights
from rlhf.sections import GenerateSection
from tests.conftest import rlhf, write_jsonl, write_yaml

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (make test-vllm runs these)")


def tiny_llama(vocab: int = 96, hidden: int = 64, heads: int = 2, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval()


# --- pure ---------------------------------------------------------------------------------------------------------

def test_truncated_importance_weights_match_a_loop():
    torch.manual_seed(0)
    old, rollout = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    weights, stats = truncated_importance_weights(old, rollout, mask, cap=2.0)
    capped = n = 0
    for b in range(3):
        for t in range(5):
            expected = min(math.exp(old[b, t] - rollout[b, t]), 2.0) if mask[b, t] else 0.0
            assert weights[b, t].item() == pytest.approx(expected, rel=1e-6)
            if mask[b, t]:
                n += 1
                capped += math.exp(old[b, t] - rollout[b, t]) >= 2.0
    assert stats["rollout/tis_capped"].item() == pytest.approx(capped / n)
    assert not weights.requires_grad and old.shape == weights.shape


@pytest.mark.parametrize("tied", [True, False])
def test_policy_weights_are_the_adapted_model(tied):
    """LoRA deltas, trainable token rows (tied embeddings follow them) and the trained head reach a plain model:
    its logits equal the adapted model's; the adapter and the base weights are left as they were."""
    from types import SimpleNamespace

    from rlhf.lora import apply_lora
    from rlhf.vllm_engine import policy_weights

    base = tiny_llama(tied=tied)
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=[])
    policy = apply_lora(base, lora, token_ids=[90, 91])
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:  # as after some updates: B != 0, token rows moved
                p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.clone() for n, p in policy.named_parameters()}
    plain = tiny_llama(tied=tied, seed=1)
    missing, unexpected = plain.load_state_dict(dict(policy_weights(policy)), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # a tied head is the embedding itself
    ids = torch.randint(3, 96, (2, 9))
    ids[0, -1], ids[1, 3] = 90, 91
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, policy(ids).logits, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_rollout_correction_needs_the_vllm_engine(tmp_path):
    recipe = write_yaml(tmp_path / "ppo.yaml", {
        "stage": "ppo", "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path)},
        "data": {"train": str(tmp_path / "p.jsonl")},
        "ppo": {"reward_fn": "gold", "advantage_estimator": "grpo", "samples_per_prompt": 2,
                "rollout_correction": "tis"}})
    out = rlhf("check", str(recipe))
    assert out.returncode == 2 and "ppo.rollout_correction" in out.stderr and "vllm" in out.stderr


def test_vllm_sampling_settings_are_checked_at_load():
    from rlhf.errors import RecipeError

    with pytest.raises(RecipeError, match="greedily"):
        GenerateSection(engine="vllm", temperature=1e-6).validate()
    GenerateSection(engine="vllm", temperature=0.0).validate()


@pytest.mark.skipif(HAS_VLLM, reason="checks the message where vLLM is missing")
def test_the_vllm_engine_without_vllm_is_one_line(tmp_path):
    from rlhf.vllm_engine import check_installed

    with pytest.raises(UserError, match="generate.engine: vLLM is not installed"):
        check_installed("vllm")


# --- the engine (vLLM installed) ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_and_model():
    from rlhf.context import RunContext
    from rlhf.rollout import build_engine

    model = tiny_llama()
    ctx = RunContext(None, (2, 5), 0, None, 1.0, (0,), torch.device("cpu"), 8)
    cfg = GenerateSection(engine="vllm", max_new_tokens=10, temperature=1.0, batch_size=8)
    engine = build_engine(model, ctx, cfg)
    yield engine, model, ctx, cfg
    engine.close()


def prompts(n: int = 8, seed: int = 0):
    from rlhf.batching import collate_prompts

    g = torch.Generator().manual_seed(seed)
    rows = [[1] + torch.randint(6, 96, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    batch = collate_prompts([{"prompt_ids": p} for p in rows], 0)
    return batch["input_ids"], batch["attention_mask"]


def trainer_logprobs(model, gen, temperature: float = 1.0):
    from rlhf.forward import response_logprobs

    with torch.no_grad():
        lp, _ = response_logprobs(model, gen.sequences, gen.attention_mask, gen.prompt_width, temperature,
                                  suppress_ids=(0,))
    return lp * gen.response_mask


@needs_vllm
def test_greedy_equals_the_seeded_engine(engine_and_model):
    from dataclasses import replace

    from rlhf.rollout import generate

    engine, model, ctx, cfg = engine_and_model
    ids, mask = prompts()
    greedy = replace(cfg, temperature=0.0)
    ours = engine.generate(ids, mask, greedy)
    seeded = generate(model, ids, mask, greedy, ctx.stop_ids, ctx.pad_id, engine="seeded")
    width = seeded.responses.shape[1]
    assert torch.equal(ours.response_mask[:, :width], seeded.response_mask)
    assert torch.equal(ours.responses[:, :width], seeded.responses) and ours.responses[:, width:].eq(0).all()
    assert torch.equal(ours.ended, seeded.ended)


@needs_vllm
def test_logprobs_follow_every_sync_and_rows_do_not_depend_on_batching(engine_and_model):
    """Three updates of the weights, each pushed with `sync`: the sampler's log-probs equal a transformers forward
    of the current weights (fp32, 1e-4); a row's sample is the same when the batch is reversed."""
    from rlhf.rollout import row_keys

    engine, model, ctx, cfg = engine_and_model
    ids, mask = prompts(8, seed=1)
    keys = row_keys(0, 3, range(8))
    for update in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        engine.sync(model)
        gen = engine.generate(ids, mask, cfg, keys)
        assert gen.response_mask.sum() > 0
        diff = (gen.logprobs - trainer_logprobs(model, gen)).abs().max().item()
        assert diff < 1e-4, f"after sync {update + 1}: {diff}"
    flipped = engine.generate(ids.flip(0), mask.flip(0), cfg, keys.flip(0))
    assert torch.equal(flipped.responses.flip(0), gen.responses)


@needs_vllm
def test_unsupported_models_are_one_line_naming_the_key():
    from rlhf.vllm_engine import check_model

    odd = tiny_llama(hidden=32, heads=2).config  # head size 16: the CPU kernel refuses it
    with pytest.raises(UserError, match="generate.engine: vLLM's CPU attention takes head sizes"):
        check_model(odd, "cpu")
    unknown = tiny_llama().config
    unknown.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(UserError, match="generate.engine: vLLM does not know the architecture"):
        check_model(unknown, "cpu")


def qwen2_folder(root, corpus):
    """A tiny Qwen2 (tied embeddings, ChatML) with a head size vLLM's CPU kernel takes (32)."""
    import transformers

    from tests.families import FAMILIES

    tok = FAMILIES["qwen2"].tokenizer(corpus)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@needs_vllm
@pytest.mark.parametrize("variant", ["lora", "full_tis"])
def test_ppo_stage_with_vllm_rollouts(variant, tmp_path):
    """GRPO with the gold reward on a Qwen2 (not Llama): LoRA, or full fine-tuning with TIS. Every iteration logs
    the sampler/trainer difference, under 1e-4 in fp32 although the weights change after every update."""
    from data_formats import tasks
    from rlhf.sections import TaskSuiteSection

    data = tasks.as_conversations(tasks.generate(TaskSuiteSection(
        sft_records=8, preference_records=8, prompt_records=32, eval_records=16, corpus_documents=300), seed=0))
    model = qwen2_folder(tmp_path / "model", data["corpus"])
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", data["prompts"])
    gold_file = write_jsonl(tmp_path / "gold.jsonl", data["eval_prompts"])
    recipe = {"stage": "ppo", "output_dir": str(tmp_path / "ppo"), "model": {"name_or_path": str(model)},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
              "data": {"train": str(prompts_file), "template": "chat", "max_prompt_len": 64},
              "generate": {"engine": "vllm", "max_new_tokens": 8, "batch_size": 16},
              "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0,
                        "save_every": 0},
              "ppo": {"reward_fn": "gold", "advantage_estimator": "grpo", "samples_per_prompt": 2,
                      "rollout_batch_size": 4, "ppo_epochs": 1, "gold_prompts": str(gold_file), "gold_every": 1,
                      "gold_count": 8}}
    if variant == "full_tis":
        recipe["lora"] = None
        recipe["train"]["lr"] = 1e-4
        recipe["ppo"].update(rollout_correction="tis", rollout_correction_cap=2.0)
    out = rlhf("ppo", str(write_yaml(tmp_path / "ppo.yaml", recipe)), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/logprob_diff_max" in r]
    assert len(steps) == 3 and all(r["rollout/logprob_diff_max"] < 1e-4 for r in steps), steps
    assert all("gold/accuracy" in r for r in steps)
    if variant == "full_tis":
        assert all(0.9 < r["rollout/tis_weight_mean"] < 1.1 for r in steps)
    else:  # the exported (merged) model in vLLM: greedy equals transformers' on the parity prompts
        export = write_yaml(tmp_path / "export.yaml", {
            "stage": "export", "output_dir": str(tmp_path / "export"), "source": str(tmp_path / "ppo"),
            "export": {"dtype": "float32", "parity_count": 3, "parity_new_tokens": 6}})
        out = rlhf("export", str(export), env={"OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
        assert manifest["parity"]["vllm"] == {"greedy_match": 1.0, "prompts": 3}
