"""A shortened version of the shipped tiny chain, for tests: the same recipe files with overrides that
point every path into a temp folder and cut the steps and the model size."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from rlhf.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny"

SHORT = {
    "tasks": ["tasks.sft_records=320", "tasks.preference_records=1500", "tasks.prompt_records=128",
              "tasks.eval_records=100", "tasks.corpus_documents=1200"],
    "pretrain": ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=2",
                 "tokenizer.vocab_size=400", "data.max_len=64", "train.max_steps=40", "train.batch_size=16",
                 "train.micro_batch_size=8", "train.eval_every=15", "train.save_every=0", "train.log_every=5"],
    "sft": ["train.max_steps=20", "train.batch_size=16", "train.micro_batch_size=8", "train.eval_every=10",
            "train.save_every=0", "train.lr=1e-3", "samples=2"],
    "rm": ["train.max_steps=120", "train.epochs=3", "train.batch_size=32", "train.micro_batch_size=16",
           "train.eval_every=60", "train.save_every=0"],
    "ppo": ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=4", "ppo.rollout_batch_size=16",
            "generate.batch_size=16", "generate.max_new_tokens=8", "ppo.gold_every=1", "ppo.gold_count=8",
            "train.save_every=0"],
    "grpo": ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=4", "ppo.rollout_batch_size=4",
             "generate.batch_size=16", "generate.max_new_tokens=8", "ppo.gold_every=1", "ppo.gold_count=8",
             "train.save_every=0"],
    **{name: ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=4", "ppo.rollout_batch_size=4",
              "generate.batch_size=16", "generate.max_new_tokens=8", "ppo.gold_every=1", "ppo.gold_count=8",
              "train.save_every=0"] for name in ("dr_grpo", "dapo", "gspo")},
    "dpo": ["train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=4", "train.eval_every=2",
            "train.save_every=0"],
    **{name: ["train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=4", "train.eval_every=2",
              "train.save_every=0"] for name in ("simpo", "orpo")},
    "eval": ["eval.max_prompts=16", "generate.max_new_tokens=8", "generate.batch_size=16"],
    "export": ["export.parity_count=2", "export.parity_new_tokens=4"],
}


def paths(root: Path, text: str) -> str:
    return text.replace("runs/tiny", str(root))


def write_recipe(name: str, root: Path) -> Path:
    """The shipped tiny recipe `name` (recipes/tiny/<name>.yaml) with its paths redirected into `root`."""
    import yaml

    raw = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    path = root / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # written atomically: test processes running side by side (spawned workers) write the same file
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(paths(root, yaml.safe_dump(raw, sort_keys=False)))
    os.replace(tmp, path)
    return path


def stage_of(name: str) -> str:
    """The stage of a tiny recipe (grpo.yaml is a ppo recipe; the others are named after their stage)."""
    ppo_recipes, dpo_recipes = ("grpo", "dr_grpo", "dapo", "gspo"), ("simpo", "orpo")
    return "ppo" if name in ppo_recipes else "dpo" if name in dpo_recipes else name


def recipe(name: str, root: Path, *extra: str):
    """The shipped tiny recipe `name`, redirected into `root` and shortened (plus `extra` overrides)."""
    return load_recipe(write_recipe(name, root), stage_of(name), SHORT[name] + list(extra))


def run_stage(name: str, root: Path, *extra: str) -> Path:
    return importlib.import_module(f"stages.{stage_of(name)}").run(recipe(name, root, *extra))


def build_chain(root: Path) -> dict[str, Path]:
    out = {}
    for stage in ("tasks", "pretrain", "sft", "rm"):
        out[stage] = run_stage(stage, root)
    out["root"] = root
    return out


def cli_args(name: str, root: Path, *extra: str) -> list[str]:
    """`rlhf STAGE RECIPE overrides...` arguments for the shortened recipe (for subprocess runs)."""
    return [stage_of(name), str(write_recipe(name, root)), *SHORT[name], *extra]
