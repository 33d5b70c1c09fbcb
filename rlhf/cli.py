"""`rlhf` command line: run a stage from a recipe, check a recipe, plan memory, report on runs.

    rlhf STAGE RECIPE.yaml [dotted.key=value ...]     STAGE: tasks pretrain sft rm ppo dpo eval export
    rlhf STAGE --help                                 every recipe key of STAGE with its help
    rlhf check RECIPE.yaml [key=value ...]            pre-flight: recipe, data, tokenizer, masking
    rlhf plan RECIPE.yaml [--gpu-mem 80GiB]           memory per role before launching
    rlhf report RUN_DIR... [--out DIR]                Markdown/HTML page with tables and plots

Errors a user can cause print one line `error: <where>: <key>: <problem>` and exit with code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from rlhf.errors import Interrupted, UserError

STAGES = {
    "tasks": "generate the built-in verifiable task suite (corpus, SFT, preferences, prompts)",
    "pretrain": "train a byte-level BPE tokenizer and a small Llama model from scratch",
    "sft": "supervised fine-tuning on Alpaca-format instructions (LoRA or full)",
    "rm": "pairwise (Bradley-Terry) reward model",
    "ppo": "PPO with actor, critic, frozen reference and frozen reward model",
    "dpo": "direct preference optimisation",
    "eval": "gold accuracy, reward, KL, length and EOS rate of several models",
    "export": "merge adapters, verify parity, write a model card, optionally push to the hub",
}
TOOLS = {
    "check": "pre-flight check of a recipe and its data",
    "plan": "memory plan per role and device for a recipe",
    "report": "Markdown/HTML report with plots for run folders",
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
        warnings.filterwarnings("ignore", category=FutureWarning)
    except ImportError:
        pass


def _usage() -> str:
    lines = [__doc__.strip(), "", "stages:"]
    lines += [f"  {k:<9} {v}" for k, v in STAGES.items()]
    lines += ["", "tools:"] + [f"  {k:<9} {v}" for k, v in TOOLS.items()]
    return "\n".join(lines)


def run_stage(stage: str, recipe_path: str, overrides: list[str]):
    from rlhf.recipes import load_recipe

    recipe = load_recipe(recipe_path, stage, overrides)
    try:
        module = importlib.import_module(f"stages.{stage}")
    except ModuleNotFoundError as err:
        if err.name == f"stages.{stage}":
            raise UserError(f"stage '{stage}' is not built yet") from None
        raise
    try:
        return module.run(recipe)
    except UserError:
        if os.environ.get("RANK", "0") == "0":
            from rlhf.artifacts import RunFolder

            RunFolder.discard_failed(recipe)  # nothing half-written stays behind (checkpoints do)
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    _quiet_libraries()
    try:
        if command in STAGES:
            if not rest or rest[0] in ("-h", "--help"):
                from rlhf.config import describe
                from rlhf.recipes import RECIPES

                print(f"usage: rlhf {command} RECIPE.yaml [dotted.key=value ...]\n\n{STAGES[command]}\n\n"
                      "recipe keys:")
                print("\n".join("  " + line for line in describe(RECIPES[command])))
                return 0 if rest else 2
            out = run_stage(command, rest[0], rest[1:])
            if out is not None and os.environ.get("RANK", "0") == "0":
                print(f"done: {out}")
            return 0
        if command == "check":
            from rlhf.check import main as check_main

            return check_main(rest)
        if command == "plan":
            from rlhf.plan import main as plan_main

            return plan_main(rest)
        if command == "report":
            from rlhf.report import main as report_main

            return report_main(rest)
        raise UserError(f"unknown command {command!r}; run `rlhf --help` for the stages and tools")
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(err.line(), file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"{err.message}\nresume with the same command (or add resume=true)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
