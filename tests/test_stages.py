"""Stage runs on tiny models built locally (the shortened tiny chain of tests/chain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.data import collate_sft, encode_sft, load_split
from rlhf.forward import label_logprobs
from rlhf.losses import masked_sum
from rlhf.models import load_model, load_tokenizer
from rlhf.recipes import SFTData
from rlhf.scoring import load_scorer
from data_formats.schemas import parse_alpaca
from tests.chain import run_stage


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(run: Path, key: str) -> list[float]:
    return [m[key] for m in metrics(run) if m.get(key) is not None]


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_run_folders_are_complete(chain):
    for stage in ("tasks", "pretrain", "sft", "rm"):
        run = chain[stage]
        m = manifest(run)
        assert m["stage"] == stage and m["recipe"]["stage"] == stage
        assert (run / "recipe.yaml").is_file() and m["recipe_sha256"] and m["versions"]["torch"]
        assert not Path(str(run) + ".partial").exists()
        if stage != "tasks":
            assert (run / "metrics.jsonl").is_file() and list((run / "tb").iterdir())
            assert m["inputs"] and all("sha256" in v for v in m["inputs"].values())
            assert m["metrics"]["train/steps"] > 0 and m["wall_time_s"] > 0
            assert not (run / "checkpoints").exists()
    assert manifest(chain["sft"])["inputs"]["model"]["path"] == str(chain["pretrain"].resolve())
    # the resolved recipe is complete: it loads as it is and equals the manifest's copy
    from rlhf.config import to_dict
    from rlhf.recipes import load_recipe

    assert to_dict(load_recipe(chain["sft"] / "recipe.yaml")) == manifest(chain["sft"])["recipe"]


def test_pretrain_learns_and_loads_with_plain_transformers(chain):
    losses = series(chain["pretrain"], "train/loss")
    assert losses[-1] < losses[0] - 1.0
    folder = chain["pretrain"] / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tok.pad_token_id != tok.eos_token_id and tok("a b")["input_ids"][0] == tok.bos_token_id
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    fp = manifest(chain["pretrain"])["model_info"]["fingerprint"]
    logits = model(input_ids=torch.tensor([fp["input_ids"]])).logits[0, -1, :len(fp["values"])]
    assert torch.allclose(logits, torch.tensor(fp["values"]), atol=1e-5)


def test_pretrain_is_deterministic(tmp_path, chain):
    extra = ["train.max_steps=4", "train.eval_every=0", f"data.train=[{chain['tasks']}/corpus.txt]"]
    a = run_stage("pretrain", tmp_path / "a", *extra, f"output_dir={tmp_path}/a/pretrain")
    b = run_stage("pretrain", tmp_path / "b", *extra, f"output_dir={tmp_path}/b/pretrain")
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in ms]  # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))


def test_sft_trains_only_lora_and_the_adapter_reloads(chain):
    run = chain["sft"]
    losses = series(run, "train/loss")
    assert losses[-1] < losses[0]
    m = manifest(run)
    with safe_open(str(run / "model" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        saved = sum(f.get_tensor(k).numel() for k in keys)
        assert all("lora_" in k for k in keys)
        assert all(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # trained away from zero
    assert m["trainable_parameters"] == saved
    # plain peft + transformers reproduce the outputs of the model as it was at the end of training
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(chain["pretrain"] / "model")
    model = PeftModel.from_pretrained(base, run / "model").eval()
    fp = m["model_info"]["fingerprint"]
    logits = model(input_ids=torch.tensor([fp["input_ids"]])).logits[0, -1, :len(fp["values"])]
    assert torch.allclose(logits, torch.tensor(fp["values"]), atol=1e-5)
    base_again = dict(AutoModelForCausalLM.from_pretrained(chain["pretrain"] / "model").named_parameters())
    compared = 0
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_again[name.replace(".base_layer", "")]), name  # the base is untouched
            compared += 1
    assert compared == len(base_again)
    assert (run / "samples.md").read_text().startswith("| prompt | completion | EOS |")
    assert (run / "best" / "adapter_model.safetensors").is_file()


def test_packing_gives_the_same_loss_as_padding(chain):
    tok = load_tokenizer(str(chain["pretrain"]))
    model = load_model(str(chain["pretrain"])).eval()
    records = load_split(SFTData(train=str(chain["tasks"] / "sft.jsonl"), template="plain"), parse_alpaca, 0).train
    examples, _ = encode_sft(records[:6], tok, 96, False)
    losses = []
    for packing in (False, True):
        batch = collate_sft(examples, tok.pad_token_id, packing)
        with torch.no_grad():
            lp, mask, _ = label_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                         batch["position_ids"])
        losses.append(float(-masked_sum(lp, mask) / mask.sum()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_reward_model_learns_ignores_padding_and_reloads(chain):
    run = chain["rm"]
    m = manifest(run)
    assert m["metrics"]["eval/rewards/accuracy"] > 0.6
    assert (run / "reward_stats.json").is_file() and m["reward_stats"]["std"] > 0
    scorer = load_scorer(str(run))
    ids = scorer.tokenizer(["Reverse the list.\na b\nb a"])["input_ids"][0] + [scorer.tokenizer.eos_token_id]
    pad = scorer.tokenizer.pad_token_id
    plain = scorer.score_ids(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    right = scorer.score_ids(torch.tensor([ids + [pad] * 5]), torch.tensor([[1] * len(ids) + [0] * 5]))
    left = scorer.score_ids(torch.tensor([[pad] * 3 + ids]), torch.tensor([[0] * 3 + [1] * len(ids)]))
    assert torch.allclose(plain, right, atol=1e-5) and torch.allclose(plain, left, atol=1e-5)
    # the saved folder is a plain sequence-classification model whose scores match the scorer's
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    assert torch.allclose(hf(input_ids=torch.tensor([ids])).logits[0], plain, atol=1e-5)
    fp = m["model_info"]["fingerprint"]
    values = scorer.model(torch.tensor([fp["input_ids"]]), torch.ones(1, len(fp["input_ids"]), dtype=torch.long))
    assert torch.allclose(values[0], torch.tensor(fp["values"]), atol=1e-5)
    texts = ["Sort the list in alphabetical order.\nb a\na b", "Reverse the list.\na b c\nc b a"]
    assert torch.equal(load_scorer(str(run))(texts), scorer(texts))


@pytest.fixture(scope="module")
def ppo_run(chain):
    return run_stage("ppo", chain["root"], "train.max_steps=6", "ppo.gold_every=3")


def test_ppo_raises_the_reward_with_finite_kl(chain, ppo_run):
    ms = [m for m in metrics(ppo_run) if "objective/score" in m]
    assert len(ms) == 6
    first, last = ms[0]["objective/score"], sum(m["objective/score"] for m in ms[-2:]) / 2
    assert last > first
    assert all(torch.isfinite(torch.tensor(m["objective/kl"])) and m["objective/kl"] >= -1e-6 for m in ms)
    for key in ("policy/approx_kl", "policy/clipfrac", "loss/policy", "loss/value", "value/explained_var",
                "value/clipfrac", "objective/entropy", "objective/non_score_reward", "response/eos_rate",
                "time/generate_s", "time/score_s", "time/ref_values_s", "time/update_s", "perf/generate_tokens_per_s"):
        assert key in ms[-1], key
    gold = [m for m in metrics(ppo_run) if "gold/accuracy" in m]
    assert [m["step"] for m in gold] == [0, 3, 6]
    assert (ppo_run / "critic" / "adapter_config.json").is_file()
    m = manifest(ppo_run)
    assert m["kl_controller"]["value"] == pytest.approx(0.05)


def test_dpo_precomputed_and_live_reference_agree(chain):
    extra = ["train.max_steps=1", "train.eval_every=0"]
    live = run_stage("dpo", chain["root"], *extra, f"output_dir={chain['root']}/dpo_live")
    pre = run_stage("dpo", chain["root"], *extra, "dpo.precompute_ref=true", f"output_dir={chain['root']}/dpo_pre")
    assert series(live, "train/loss/dpo")[0] == pytest.approx(series(pre, "train/loss/dpo")[0], abs=1e-5)
    assert (pre / "ref_logps.safetensors").is_file()
    # with a zero-initialised adapter the policy starts at the reference: loss log 2, margin 0
    assert series(live, "train/loss/dpo")[0] == pytest.approx(0.6931, abs=1e-3)


def test_dpo_improves_preference_accuracy(chain):
    run = run_stage("dpo", chain["root"], "train.max_steps=12", "train.eval_every=12", "train.lr=3e-3")
    ms = metrics(run)
    losses = series(run, "train/loss/dpo")
    assert losses[-1] < losses[0]
    assert [m for m in ms if "eval/rewards/accuracy" in m][-1]["eval/rewards/accuracy"] > 0.5
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin", "train/logps/chosen",
                "train/logps/rejected"):
        assert key in ms[0]


def test_eval_and_export(chain, ppo_run, monkeypatch):
    run_stage("dpo", chain["root"], "train.max_steps=2", "train.eval_every=0", "overwrite=true")
    ev = run_stage("eval", chain["root"])
    results = json.loads((ev / "eval.json").read_text())["results"]
    assert [r["model"] for r in results] == ["base", "sft", "ppo", "dpo"]
    for r in results:
        assert 0 <= r["gold_accuracy"] <= 1 and r["reward_score"] is not None and r["eos_rate"] is not None
    assert results[1]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # sft against itself
    assert "| model | gold acc. (sampled)" in (ev / "eval.md").read_text()

    out = run_stage("export", chain["root"])
    m = manifest(out)
    assert m["parity"]["merge_fp32"]["logits_ok"] and m["parity"]["merge_fp32"]["greedy_match"] == 1.0
    card = (out / "model" / "README.md").read_text()
    for text in ("## Lineage", "| ppo |", "| sft |", "| pretrain |", "## LoRA", "## Prompt template",
                 "## Intended use", "## Evaluation"):
        assert text in card, text
    # the merged model needs no peft to load, and matches the adapter chain's logits
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    reference = load_model(str(ppo_run)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)


def test_a_tokenizer_without_pad_gets_a_dedicated_one(chain, tmp_path):
    tok = AutoTokenizer.from_pretrained(chain["pretrain"] / "model")
    base = tmp_path / "nopad"
    AutoModelForCausalLM.from_pretrained(chain["pretrain"] / "model").save_pretrained(base)
    raw = json.loads(tok.backend_tokenizer.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != tok.pad_token]
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    (base / "tokenizer.json").write_text(json.dumps(raw))
    (base / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    run = run_stage("sft", chain["root"], f"model.name_or_path={base}", "train.max_steps=3",
                    f"output_dir={tmp_path}/sft")
    saved = AutoTokenizer.from_pretrained(run / "model")
    assert saved.pad_token == "<|pad|>" and saved.pad_token_id != saved.eos_token_id
    model = load_model(str(run))  # base resized the same way, adapter merged
    assert model.get_input_embeddings().weight.shape[0] == len(saved)
    fp = manifest(run)["model_info"]["fingerprint"]
    from peft import PeftModel

    plain = AutoModelForCausalLM.from_pretrained(base)
    from rlhf.models import resize_embeddings

    resize_embeddings(plain, len(saved))
    logits = PeftModel.from_pretrained(plain, run / "model")(input_ids=torch.tensor([fp["input_ids"]])).logits
    assert torch.allclose(logits[0, -1, :len(fp["values"])], torch.tensor(fp["values"]), atol=1e-5)


def test_ipo_and_label_smoothing_runs(chain, tmp_path):
    for extra in (["dpo.loss_type=ipo"], ["dpo.label_smoothing=0.1", "lora=null"]):
        run = run_stage("dpo", chain["root"], "train.max_steps=2", "train.eval_every=0", *extra,
                        f"output_dir={tmp_path}/{extra[0].split('=')[0]}")
        loss = series(run, "train/loss/dpo")
        assert loss and all(v == v for v in loss)
        if "lora=null" in extra:  # a frozen copy is the reference; the output is a full model
            assert (run / "model" / "model.safetensors").is_file()
