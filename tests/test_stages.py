"""Stage runs on tiny models built locally (the shortened tiny chain of tests/chain.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.data import encode_sft, load_split
from rlhf.batching import collate_sft
from rlhf.forward import label_logprobs
from rlhf.losses import masked_sum
from rlhf.models import load_model
from rlhf.tokenization import load_tokenizer
from rlhf.sections import SFTData
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
    assert (run / "samples.md").read_text().startswith("| prompt | completion | EOS |")
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert m["metrics"]["eval/perplexity"] == pytest.approx(math.exp(m["metrics"]["eval/loss"]), rel=1e-6)
    assert m["metrics"]["eval/loss"] < series(run, "eval/loss")[0] or len(series(run, "eval/loss")) == 1


def test_sft_changes_only_lora_parameters(chain, tmp_path, monkeypatch):
    """The model as the training loop leaves it: LoRA weights moved, every other weight bit-identical."""
    import rlhf.loop

    seen = {}
    train_loop = rlhf.loop.run

    def spy(accelerator, folder, train, seed, model, *rest):
        params = dict(model.named_parameters())
        seen["trainable"] = {n for n, p in params.items() if p.requires_grad}
        seen["before"] = {n: p.detach().clone() for n, p in params.items()}
        out = train_loop(accelerator, folder, train, seed, model, *rest)
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return out

    monkeypatch.setattr(rlhf.loop, "run", spy)
    run_stage("sft", chain["root"], "train.max_steps=3", "train.eval_every=0", "samples=0",
              f"output_dir={tmp_path}/sft")
    before, after = seen["before"], seen["after"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    assert all(not torch.equal(before[n], after[n]) for n in seen["trainable"] if "lora_B" in n)
    frozen = [n for n in before if n not in seen["trainable"]]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)


def test_sft_loss_is_one_token_weighted_mean_over_the_accumulated_batch(chain, tmp_path):
    """Step 1 (before any update) with 1 micro-batch of 16, 4 micro-batches of 4, and packed micro-batches:
    the same loss, equal to sum(NLL) / sum(trained tokens) over the step's examples, which differs from
    a mean of per-micro-batch means on these uneven lengths."""
    from rlhf.batching import plan_batches
    from tests.chain import recipe

    common = ["train.max_steps=1", "train.batch_size=16", "train.eval_every=0", "train.log_every=1", "samples=0"]
    runs = {name: run_stage("sft", chain["root"], *common, *extra, f"output_dir={tmp_path}/{name}")
            for name, extra in {"one": ["train.micro_batch_size=16"], "four": ["train.micro_batch_size=4"],
                                "packed": ["train.micro_batch_size=4", "data.packing=true"]}.items()}
    losses = {name: series(run, "train/loss")[0] for name, run in runs.items()}

    r = recipe("sft", chain["root"], *common, "train.micro_batch_size=4")
    tok = load_tokenizer(str(chain["pretrain"]))
    examples, _ = encode_sft(load_split(r.data, parse_alpaca, r.seed).train, tok, r.data.max_len, False)
    micros = plan_batches(len(examples), 16, 4, 0, 1, r.seed, 0, 0, [len(e["input_ids"]) for e in examples])
    model = load_model(str(chain["pretrain"])).eval()  # the LoRA update starts at zero: step 1 sees the base
    nll, tokens, micro_means = 0.0, 0.0, []
    with torch.no_grad():
        for idx in micros:
            batch = collate_sft([examples[i] for i in idx], tok.pad_token_id, False)
            lp, mask, _ = label_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                         batch["position_ids"])
            nll, tokens = nll - float(masked_sum(lp, mask)), tokens + float(mask.sum())
            micro_means.append(float(-masked_sum(lp, mask) / mask.sum()))
    assert losses["one"] == pytest.approx(nll / tokens, abs=1e-5)
    assert losses["four"] == pytest.approx(nll / tokens, abs=1e-5)
    assert losses["packed"] == pytest.approx(nll / tokens, abs=1e-5)
    assert abs(sum(micro_means) / len(micro_means) - nll / tokens) > 1e-3  # the two definitions differ here


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


def test_packed_pairs_score_as_padded_ones(chain):
    """Rewards (rm) and summed or averaged response logps (dpo) of packed pairs match the padded batch's."""
    from rlhf.data import load_pairs
    from rlhf.batching import collate_pairs
    from stages.dpo import pair_logps
    from stages.rm import pair_rewards
    from tests.chain import recipe

    scorer = load_scorer(str(chain["rm"]))
    pairs = load_pairs(recipe("rm", chain["root"]).data, scorer.tokenizer, 0)[0][:5]
    padded, packed = (collate_pairs(pairs, scorer.tokenizer.pad_token_id, packing) for packing in (False, True))
    # no more rows, no wider (these pairs are 14 to 20 tokens: two never share a row of the longest's width)
    assert packed["input_ids"].shape[0] <= padded["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    policy = load_model(str(chain["pretrain"])).eval()
    with torch.no_grad():
        assert torch.allclose(pair_rewards(scorer.model, packed), pair_rewards(scorer.model, padded), atol=1e-5)
        for average in (False, True):
            for a, b in zip(pair_logps(policy, packed, average), pair_logps(policy, padded, average)):
                assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_packed_pairs_give_the_padded_dpo_loss_gradients_and_rewards():
    """On a tiny float32 Llama built here: DPO loss (sigmoid on sums, ipo on per-token means) and every parameter's
    gradient, and reward-model scores, are the same from packed rows as from one padded row per sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.batching import collate_pairs
    from rlhf.losses import dpo_loss
    from rlhf.models import ScalarHead
    from stages.dpo import pair_logps
    from stages.rm import pair_rewards

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 64, (n,), generator=gen).tolist()

    pairs = [{"prompt_ids": [1] + ids(p), "chosen_ids": ids(c) + [2], "rejected_ids": ids(r) + [2], "margin": 0.0}
             for p, c, r in [(5, 9, 3), (2, 4, 12), (8, 1, 6), (3, 15, 2), (6, 6, 7)]]
    padded, packed = (collate_pairs(pairs, 0, packing) for packing in (False, True))
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    ref = torch.randn(2, len(pairs), generator=gen) - 20

    policy = LlamaForCausalLM(config).float()
    for loss_type in ("sigmoid", "ipo"):
        results = []
        for batch in (padded, packed):
            policy.zero_grad()
            chosen, rejected, chosen_sum = pair_logps(policy, batch, average=loss_type == "ipo")
            loss, _ = dpo_loss(chosen, rejected, ref[0], ref[1], beta=0.1, loss_type=loss_type)
            (loss + 1e-3 * chosen_sum).backward()
            grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
            results.append((loss.detach(), chosen.detach(), rejected.detach(), chosen_sum.detach(), grads))
        for a, b in zip(*results):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert results[0][-1].abs().sum() > 0

    head = ScalarHead(LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1})))
    with torch.no_grad():
        assert torch.allclose(pair_rewards(head, packed), pair_rewards(head, padded), atol=1e-5)


def test_packed_rm_and_dpo_runs_train_as_padded_ones(chain, tmp_path):
    """`data.packing: true` runs rm and dpo (live and precomputed reference) and logs the padded runs' losses."""
    extra = ["train.max_steps=2", "train.eval_every=0", "train.log_every=1", "train.warmup_ratio=0"]
    for stage, key, more in (("rm", "train/loss/pairwise", []), ("dpo", "train/loss/dpo", ["train.lr=3e-3"]),
                             ("dpo", "train/loss/dpo", ["train.lr=3e-3", "dpo.precompute_ref=true"])):
        losses = []
        for packing in ("false", "true"):
            run = run_stage(stage, chain["root"], *extra, *more, f"data.packing={packing}",
                            f"output_dir={tmp_path}/{stage}-{len(more)}-{packing}")
            assert manifest(run)["recipe"]["data"]["packing"] is (packing == "true")
            losses.append(series(run, key))
        assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-4)


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
    """Live reference = the policy with its adapter disabled; precomputed = logps stored before training.
    After one update the policy has moved, so the two agree at step 2 only if disabling works."""
    extra = ["train.max_steps=2", "train.eval_every=0", "train.log_every=1", "train.lr=3e-3", "train.warmup_ratio=0"]
    live = run_stage("dpo", chain["root"], *extra, f"output_dir={chain['root']}/dpo_live")
    pre = run_stage("dpo", chain["root"], *extra, "dpo.precompute_ref=true", f"output_dir={chain['root']}/dpo_pre")
    live_loss, pre_loss = series(live, "train/loss/dpo"), series(pre, "train/loss/dpo")
    assert len(live_loss) == len(pre_loss) == 2
    assert live_loss == pytest.approx(pre_loss, abs=1e-5)
    assert (pre / "ref_logps.safetensors").is_file()
    # with a zero-initialized adapter the policy starts at the reference: loss log 2, margin 0
    assert live_loss[0] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(live_loss[1] - math.log(2)) > 1e-4  # then it moves away from it


def test_stored_reference_logps_are_reused(tmp_path):
    """A resumed DPO run reads the reference logps from the run folder instead of recomputing them."""
    from accelerate import Accelerator

    from stages.dpo import precompute_reference

    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 2], "margin": 0.0}] * 3
    calls = []

    def ref_pass(batch):
        calls.append(batch["input_ids"].shape[0])
        n = batch["input_ids"].shape[0] // 2
        return torch.full((n,), -1.5), torch.full((n,), -2.5)

    path = tmp_path / "ref_logps.safetensors"
    first = precompute_reference(Accelerator(cpu=True), path, {"train": pairs, "eval": []}, 0, 2, ref_pass)
    assert calls and path.is_file() and first["train_chosen"].tolist() == [-1.5] * 3
    calls.clear()
    again = precompute_reference(Accelerator(cpu=True), path, {"train": pairs, "eval": []}, 0, 2, ref_pass)
    assert not calls and torch.equal(again["train_rejected"], first["train_rejected"])


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
    grpo = run_stage("grpo", chain["root"])  # the demo's GRPO recipe: gold rewards, no reward model, no critic
    assert not (grpo / "critic").exists()
    ev = run_stage("eval", chain["root"])
    results = json.loads((ev / "eval.json").read_text())["results"]
    assert [r["model"] for r in results] == ["base", "sft", "ppo", "grpo", "dpo"]
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
    for run in (chain["sft"], ppo_run, chain["pretrain"]):  # each ancestor with its recipe hash
        assert f"`{manifest(run)['recipe_sha256'][:12]}`" in card
    assert f"`{chain['tasks'] / 'sft.jsonl'}`" in card and f"`{chain['tasks'] / 'prompts.jsonl'}`" in card
    assert '"r": 32' in card and "trained from scratch by `pretrain`" in card
    assert "| ppo | " in card.split("## Evaluation")[1]  # this model's eval row from the sibling eval run
    # the merged model needs no peft to load, and matches the unmerged adapter chain built with plain
    # transformers + peft (pretrain <- sft adapter <- ppo adapter), independent of our loading code
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain["pretrain"] / "model"),
                                    chain["sft"] / "model").merge_and_unload()
    reference = PeftModel.from_pretrained(sft, ppo_run / "model").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    assert merged.config.use_cache and merged.generation_config.pad_token_id != merged.generation_config.eos_token_id


def test_lora_reward_model_trains_its_head_and_saves_merged(chain, tmp_path):
    run = run_stage("rm", chain["root"], "lora.r=8", "lora.alpha=16", "train.max_steps=20", "train.eval_every=0",
                    f"output_dir={tmp_path}/rm-lora")
    m = manifest(run)
    assert m["trainable_parameters"] < m["parameters"] / 2  # LoRA, not full fine-tuning
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()  # merged: plain HF, no peft
    assert not (run / "model" / "adapter_config.json").exists() and hf.score.weight.abs().sum() > 0  # head trained
    fp = m["model_info"]["fingerprint"]
    values = load_scorer(str(run)).model(torch.tensor([fp["input_ids"]]),
                                         torch.ones(1, len(fp["input_ids"]), dtype=torch.long))
    assert torch.allclose(values[0], torch.tensor(fp["values"]), atol=1e-5)
    assert series(run, "train/loss/pairwise")[-1] < series(run, "train/loss/pairwise")[0]


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

    # the adapter carries the grown embeddings: plain resizing (any init of the new row) + peft reproduces it
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.resize_token_embeddings(len(saved))
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


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_policy_runs_without_dropout_like_its_reference(chain, tmp_path, disable):
    """At the first step the policy is the reference: with dropout off in both, every implicit reward is 0 and the
    loss is log 2; with dropout on in the policy only (a base model with attention dropout), the log-ratios are
    noise."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(chain["pretrain"] / "model", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    run = run_stage("dpo", chain["root"], f"model.name_or_path={base}", "train.max_steps=1", "train.log_every=1",
                    "train.eval_every=0", "lora.dropout=0.5", f"dpo.disable_dropout={str(disable).lower()}",
                    "dpo.sft_coef=0", f"output_dir={tmp_path}/run")
    (m,) = [m for m in metrics(run) if "train/loss/dpo" in m]
    if disable:
        assert m["train/rewards/chosen"] == 0 and m["train/rewards/rejected"] == 0
        assert m["train/loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(m["train/rewards/chosen"]) > 1e-4
