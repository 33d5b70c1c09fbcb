"""Recipes: one class per stage, made of the sections in `rlhf.sections`.

Every field carries a one-line help (`rlhf STAGE --help` prints them all). `load_recipe` reads a YAML
file, applies `dotted.key=value` overrides, checks every key and computes the derived batch figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf.config import apply_overrides, build, opt, parse_size, read_yaml, req, section
from rlhf.errors import RecipeError
from rlhf.sections import (ArchSection, CorpusData, DPOSection, EvalSection, ExportSection, GenerateSection,
                           LoraSection, ModelSection, PPOSection, PreferenceData, PromptData, RMSection, SFTData,
                           TaskSuiteSection, TokenizerSection, TrainSection)


# ---------------------------------------------------------------------------------------------
# stage recipes


@dataclass(kw_only=True)
class _Recipe:
    stage: str = req("the stage this recipe is for")
    output_dir: str = req("run folder to write (created when the stage finishes)")
    seed: int = opt(0, "seed for python, numpy and torch", ge=0, le=2 ** 32 - 1)  # numpy's seed range
    resume: Optional[bool] = opt(None, "null = resume if a checkpoint exists; true = resume / keep a finished run; "
                                       "false = start over")
    overwrite: bool = opt(False, "replace a finished run folder at output_dir")


@dataclass(kw_only=True)
class TasksRecipe(_Recipe):
    tasks: TaskSuiteSection = section(TaskSuiteSection, "built-in verifiable task suite")


@dataclass(kw_only=True)
class PretrainRecipe(_Recipe):
    model: ArchSection = section(ArchSection, "Llama architecture of the new model")
    tokenizer: TokenizerSection = section(TokenizerSection, "byte-level BPE tokenizer")
    data: CorpusData = req("text corpus")
    train: TrainSection = section(TrainSection, "optimization and loop")


@dataclass(kw_only=True)
class SFTRecipe(_Recipe):
    model: ModelSection = req("base model")
    lora: Optional[LoraSection] = section(LoraSection, "LoRA adapter (null = full fine-tuning)")
    data: SFTData = req("Alpaca instruction data")
    train: TrainSection = section(TrainSection, "optimization and loop")
    generate: GenerateSection = opt(GenerateSection(temperature=0.0, max_new_tokens=64),
                                    "decoding of the sample table written at the end")
    samples: int = opt(4, "eval prompts in the sample table", ge=0)


@dataclass(kw_only=True)
class RMRecipe(_Recipe):
    model: ModelSection = req("backbone (usually the sft run folder)")
    lora: Optional[LoraSection] = section(LoraSection, "LoRA adapter (null = full fine-tuning); head always trained")
    data: PreferenceData = req("pairwise preference data")
    train: TrainSection = section(TrainSection, "optimization and loop")
    rm: RMSection = section(RMSection, "reward-model options")


@dataclass(kw_only=True)
class PPORecipe(_Recipe):
    model: ModelSection = req("actor initialization (usually the sft run folder)")
    lora: Optional[LoraSection] = section(LoraSection, "LoRA for actor and critic (null = full fine-tuning)")
    data: PromptData = req("rollout prompts")
    train: TrainSection = section(TrainSection, "optimization and loop")
    generate: GenerateSection = section(GenerateSection, "rollout sampling")
    ppo: PPOSection = req("PPO hyper-parameters")

    def validate(self) -> None:
        if self.ppo.overlong_buffer > self.generate.max_new_tokens:
            raise RecipeError(f"the overlong buffer ({self.ppo.overlong_buffer} tokens) is longer than "
                              f"generate.max_new_tokens ({self.generate.max_new_tokens})", key="ppo.overlong_buffer")
        if self.ppo.rollout_correction != "none" and self.generate.engine != "vllm":
            raise RecipeError(f"{self.ppo.rollout_correction} weighs tokens by the sampler's own log-probs, which only "
                              "generate.engine: vllm reports; the other engines sample from the trained weights "
                              "themselves", key="ppo.rollout_correction")


@dataclass(kw_only=True)
class DPORecipe(_Recipe):
    model: ModelSection = req("policy initialization (usually the sft run folder)")
    lora: Optional[LoraSection] = section(LoraSection, "LoRA adapter (null = full fine-tuning)")
    data: PreferenceData = req("pairwise preference data")
    train: TrainSection = section(TrainSection, "optimization and loop")
    dpo: DPOSection = section(DPOSection, "DPO options")


@dataclass(kw_only=True)
class EvalRecipe(_Recipe):
    eval: EvalSection = req("what to evaluate")
    generate: GenerateSection = section(GenerateSection, "sampling for the sampled gold accuracy")


@dataclass(kw_only=True)
class ExportRecipe(_Recipe):
    source: str = req("run folder (or HF folder) to export")
    export: ExportSection = section(ExportSection, "export options")

    def validate(self) -> None:
        size = parse_size(self.export.max_shard_size)
        if not size:  # checked here, not when the shards are written after the parity check
            raise RecipeError(f"expected a positive whole number with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. "
                              f"'5GB', got {self.export.max_shard_size!r}", key="export.max_shard_size")


# Which stages' run folders each recipe key accepts (a hub id or plain folder is always accepted): declared
# once, read by the stages and by `rlhf check` (`rlhf.artifacts.check_parents`).
POLICY_RUNS = ("pretrain", "sft", "dpo", "ppo", "export")
REWARD_RUNS = ("rm",)
PARENT_STAGES: dict[str, dict[str, tuple[str, ...]]] = {
    "sft": {"model.name_or_path": POLICY_RUNS},
    "rm": {"model.name_or_path": ("pretrain", "sft", "dpo", "export")},
    "ppo": {"model.name_or_path": POLICY_RUNS, "ppo.reward_model": REWARD_RUNS},
    "dpo": {"model.name_or_path": POLICY_RUNS, "dpo.reference": POLICY_RUNS},
    "eval": {"eval.models": POLICY_RUNS, "eval.reference": POLICY_RUNS, "eval.reward_model": REWARD_RUNS,
             "eval.judge": REWARD_RUNS},
    "export": {"source": ("pretrain", "sft", "rm", "ppo", "dpo")},
}

RECIPES: dict[str, type] = {
    "tasks": TasksRecipe, "pretrain": PretrainRecipe, "sft": SFTRecipe, "rm": RMRecipe,
    "ppo": PPORecipe, "dpo": DPORecipe, "eval": EvalRecipe, "export": ExportRecipe,
}

# recipe keys that name what a stage reads (files, folders, run folders, hub ids): a run may not write
# over, into or around any of them (`artifacts.RunFolder` checks)
INPUT_KEYS = ("model.name_or_path", "data.train", "data.eval", "data.template", "tokenizer.existing",
              "ppo.reward_model", "ppo.gold_prompts", "dpo.reference", "eval.models", "eval.prompts",
              "eval.template", "eval.reward_model", "eval.reference", "source", "export.parity_prompts")


def input_paths(recipe) -> list[tuple[str, str]]:
    """(dotted key, value) of every input a recipe names (lists and mappings of them flattened)."""
    out = []
    for key in INPUT_KEYS:
        value = recipe
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, dict):
            out += [(f"{key}.{name}", v) for name, v in value.items()]
        elif isinstance(value, list):
            out += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            out.append((key, value))
    return out


# ---------------------------------------------------------------------------------------------
# loading


def world_size() -> int:
    """Processes in this launch (accelerate/torchrun set WORLD_SIZE)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        processes = int(raw)
    except ValueError:
        processes = 0
    if processes < 1:
        raise RecipeError(f"WORLD_SIZE={raw[:40]!r} is not a positive whole number (the launcher sets it; unset it "
                          f"for one process)", "environment")
    return processes


def load_recipe(path: str | Path, stage: str | None = None, overrides: list[str] | None = None,
                processes: int | None = None):
    """Read, override and check a recipe. `stage` None = take it from the file (for `rlhf check`)."""
    path = str(path)
    raw = read_yaml(path)
    file_stage = raw.get("stage")
    if file_stage is not None and not isinstance(file_stage, str):  # a list or mapping is not even hashable
        raise RecipeError(f"expected one of {', '.join(RECIPES)}, got {file_stage!r}", path, "stage")
    if stage is None:
        if file_stage not in RECIPES:
            raise RecipeError(f"expected one of {', '.join(RECIPES)}, got {file_stage!r}", path, "stage")
        stage = file_stage
    elif file_stage is not None and file_stage != stage:
        raise RecipeError(f"this recipe is for '{file_stage}', not '{stage}'", path, "stage")
    raw["stage"] = stage
    touched = apply_overrides(raw, list(overrides or []))
    if raw.get("stage") != stage:  # the schema was chosen by the stage; the manifest must not say another
        raise RecipeError(f"an override cannot change the stage of a '{stage}' recipe (got {raw.get('stage')!r}); "
                          f"use a recipe written for that stage", "command line", "stage")
    try:
        recipe = build(RECIPES[stage], raw, path)
        check_derived(recipe, processes or world_size())
    except RecipeError as err:
        if err.key and any(err.key == k or err.key.startswith(k + ".") or k.startswith(err.key + ".")
                           for k in touched):
            raise RecipeError(err.message, "command line", err.key) from None
        if err.where is None:
            raise RecipeError(err.message, path, err.key) from None
        raise
    return recipe


def derived(recipe, processes: int | None = None) -> dict:
    """Figures computed from the recipe: accumulation steps and effective batch."""
    processes = processes or world_size()
    train = getattr(recipe, "train", None)
    if train is None:
        return {"processes": processes}
    per_step = train.micro_batch_size * processes
    out = {"processes": processes, "micro_batch_size": train.micro_batch_size,
           "grad_accum": max(1, train.batch_size // per_step), "effective_batch_size": train.batch_size}
    ppo = getattr(recipe, "ppo", None)
    if ppo is not None:
        out["rollout_per_process"] = ppo.rollout_batch_size // processes
        out["episodes_per_iteration"] = ppo.rollout_batch_size * ppo.samples_per_prompt
        out["minibatches_per_epoch"] = out["episodes_per_iteration"] // train.batch_size
    return out


def check_derived(recipe, processes: int) -> None:
    train = getattr(recipe, "train", None)
    if train is None:
        return
    per_step = train.micro_batch_size * processes
    if train.batch_size % per_step:
        raise RecipeError(
            f"{train.batch_size} is not a multiple of micro_batch_size {train.micro_batch_size} x "
            f"{processes} process(es) = {per_step}", key="train.batch_size")
    ppo = getattr(recipe, "ppo", None)
    if ppo is not None and (ppo.rollout_batch_size * ppo.samples_per_prompt) % train.batch_size:
        raise RecipeError(f"{ppo.rollout_batch_size} prompts x {ppo.samples_per_prompt} samples is not a multiple "
                          f"of train.batch_size {train.batch_size} (responses per minibatch)",
                          key="ppo.rollout_batch_size")
    if ppo is not None and ppo.rollout_batch_size % processes:
        raise RecipeError(f"{ppo.rollout_batch_size} is not divisible by {processes} processes",
                          key="ppo.rollout_batch_size")
    if ppo is not None and recipe.generate.temperature == 0:
        raise RecipeError("PPO needs sampled rollouts: greedy decoding picks tokens the policy did not sample, so "
                          "ratios, KL and the policy gradient would be biased; use a temperature > 0 (greedy stays "
                          "fine in eval and sample tables)", key="generate.temperature")
    if ppo is not None and train.mixed_precision == "fp16":
        raise RecipeError("PPO steps two optimizers (actor, critic) and fp16 loss scaling has one grad scaler; "
                          "use bf16 or no", key="train.mixed_precision")

