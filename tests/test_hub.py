"""Hub ids are inspected like local folders, through the real hub-id code path, offline: a model placed in a local
hub cache under its id (`HF_HOME` laid out as huggingface_hub writes it, `HF_HUB_OFFLINE=1`), in a subprocess
(huggingface_hub reads `HF_HOME` when it is imported)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from tests.chain import ROOT, cli_args, write_recipe
from tests.conftest import rlhf, write_jsonl
from tests.families import write_hub_cache

# Runs PPO with the reward model given as a hub id, records what the reward model scored, and scores the same
# rollouts again: with the snapshot loaded as a plain transformers model (the head's output), as a local folder,
# and with the rm run folder it was copied from.
SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification
import rlhf.scoring
from rlhf.recipes import load_recipe
from rlhf.models import position_ids_from_mask
from rlhf.rollout import decode_responses
from rlhf.scoring import RewardScorer, read_reward_stats
from stages import ppo

recipe_path, snapshot, run_folder, *overrides = sys.argv[1:]
recorded, original = [], RewardScorer.score_generation

def spy(self, gen, prompts, tokenizer, fmt):
    scores = original(self, gen, prompts, tokenizer, fmt)
    recorded.append((self, gen, prompts, tokenizer, fmt, scores))
    return scores

RewardScorer.score_generation = spy
ppo.run(load_recipe(recipe_path, "ppo", overrides))
RewardScorer.score_generation = original
head = AutoModelForSequenceClassification.from_pretrained(snapshot).eval()
local, run = RewardScorer(snapshot), RewardScorer(run_folder)
out = {"stats": {spec: read_reward_stats(spec) for spec in ("org/tiny-rm", "org/tiny-rm-stats")}, "batches": []}
for scorer, gen, prompts, tokenizer, fmt, scores in recorded:
    by_ids = scorer.reads_ids_of(tokenizer, fmt)
    with torch.no_grad():
        if by_ids:
            mask = gen.attention_mask
            direct = head(input_ids=gen.sequences, attention_mask=mask,
                          position_ids=position_ids_from_mask(mask)).logits[:, 0].tolist()
        else:
            texts = decode_responses(tokenizer, gen)
            direct = [float(head(input_ids=torch.tensor([scorer.encode(p, t, e)])).logits[0, 0])
                      for p, t, e in zip(prompts, texts, gen.ended.tolist())]
    out["batches"].append({"by_ids": by_ids, "scores": scores.tolist(), "direct": direct,
                           "local": local.score_generation(gen, prompts, tokenizer, fmt).tolist(),
                           "run": run.score_generation(gen, prompts, tokenizer, fmt).tolist()})
print("RESULT " + json.dumps(out))
"""


def test_a_hub_reward_model_loads_with_its_head(chain, tmp_path):
    home = tmp_path / "hf"
    snapshot = write_hub_cache(home, "org/tiny-rm", chain["rm"] / "model")
    (snapshot / "reward_stats.json").unlink()  # a reward model from elsewhere has no stored statistics
    write_hub_cache(home, "org/tiny-rm-stats", chain["rm"] / "model", commit="1" * 40)  # one exported by us has
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # the default `ppo.reward_stats: rm_data` needs statistics the hub model lacks: one line, before models load
    hub = ["ppo.reward_model=org/tiny-rm", "ppo.gold_every=0", "train.max_steps=1"]
    done = rlhf(*cli_args("ppo", chain["root"], *hub, f"output_dir={tmp_path}/refused"), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: ppo.reward_stats: org/tiny-rm stores no mean/std of its scores (an rm run of this pipeline, or its "
        "export, does); set ppo.reward_stats: policy to measure them on the starting policy's samples, or "
        "ppo.normalize_reward: false")
    overrides = [*hub, "ppo.reward_stats=policy", "ppo.normalize_reward=false", f"output_dir={tmp_path}/ppo"]
    recipe = write_recipe("ppo", chain["root"])
    args = cli_args("ppo", chain["root"], *overrides)[2:]
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(recipe), str(snapshot), str(chain["rm"]), *args],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["stats"]["org/tiny-rm"] is None and out["stats"]["org/tiny-rm-stats"]["std"] > 0
    assert out["batches"]  # the statistics pass and the rollout
    for batch in out["batches"]:
        # the hub copy of our rm run declares the text template it was trained with: it reads the policy's ids
        scores = batch["scores"]
        assert batch["by_ids"]
        assert any(abs(s) > 1e-3 for s in scores)  # a head, not the zero head of a causal LM made scalar
        for other in ("direct", "local", "run"):  # the head's output; the same as a folder or the rm run
            assert all(abs(a - b) < 1e-4 for a, b in zip(scores, batch[other])), (other, scores, batch[other])
    manifest = json.loads((tmp_path / "ppo" / "manifest.json").read_text())
    assert manifest["inputs"]["reward_model"] == {"hub_id": "org/tiny-rm", "kind": "hub"}
    shutil.rmtree(home)


def ultrafeedback_rows(n: int, start: int = 0) -> list[dict]:
    """Rows in HuggingFaceH4/ultrafeedback_binarized's form (every split has all these columns)."""
    rows = []
    for i in range(start, start + n):
        prompt = f"Sort the list.\n\n{' '.join('dcba'[j % 4] for j in range(i % 3 + 3))} {i}"
        turns = lambda reply: [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]  # noqa
        good, bad = " ".join(sorted(prompt.split()[3:])), "I do not know."
        rows.append({"prompt": prompt, "prompt_id": str(i), "chosen": turns(good), "rejected": turns(bad),
                     "messages": turns(good), "score_chosen": 8.0, "score_rejected": 2.0})
    return rows


def test_hub_recipes_dry_run(tmp_path):
    """recipes/hub/ (Qwen2.5-0.5B-Instruct, UltraFeedback) end to end against a tiny Qwen2 stand-in with ChatML and
    rows of the dataset's form, so that a key or format drift breaks CI."""
    import importlib

    from rlhf.recipes import load_recipe
    from tests.families import build

    model = build("qwen2", tmp_path / "qwen", [r["prompt"] for r in ultrafeedback_rows(40)])
    train = write_jsonl(tmp_path / "uf_train.jsonl", ultrafeedback_rows(24))
    test = write_jsonl(tmp_path / "uf_test.jsonl", ultrafeedback_rows(8, start=100))
    small = ["train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_every=0",
             "train.save_every=0", "model.dtype=float32"]
    data = [f"data.train={train}", f"data.eval={test}"]
    runs = {}

    def run(stage: str, *overrides: str) -> Path:
        extra = small if stage != "export" else []
        recipe = load_recipe(ROOT / "recipes" / "hub" / f"{stage}.yaml", None,
                             [*extra, *overrides, f"output_dir={tmp_path / stage}"])
        runs[stage] = importlib.import_module(f"stages.{stage}").run(recipe)
        return runs[stage]

    run("sft", f"model.name_or_path={model}", *data, "samples=1", "generate.max_new_tokens=4")
    run("rm", f"model.name_or_path={runs['sft']}", *data)
    run("ppo", f"model.name_or_path={runs['sft']}", f"ppo.reward_model={runs['rm']}", f"data.train={train}",
        "ppo.rollout_batch_size=4", "generate.max_new_tokens=4", "generate.batch_size=4")
    run("dpo", f"model.name_or_path={runs['sft']}", *data)
    export = run("export", f"source={runs['ppo']}", "export.dtype=float32", "export.parity_count=1")
    gen = json.loads((export / "model" / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(export / "model")
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<|im_end|>", "<|endoftext|>"]
    assert tok.pad_token == "<|endoftext|>" and "<|im_start|>assistant" in (export / "model" / "README.md").read_text()
    counts = json.loads((runs["sft"] / "manifest.json").read_text())["data"]
    assert counts["train_records"] == 24 and counts["invalid_skipped"] == 0
