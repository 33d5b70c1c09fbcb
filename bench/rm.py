"""Reward-model throughput: TRL's RewardTrainer vs our `rm` stage, same model, pairs, batch and precision.

    python bench/rm.py --sizes 270m,1b        # on the GPU
    python bench/rm.py --sizes small          # CPU, ~17M parameters (part of `bench/suite.py --cpu`)
    python bench/rm.py --tiny                 # CPU smoke run

One epoch over the same preference pairs (every pair fits `max_len`, so TRL filters none and we
truncate none), full fine-tuning on both sides, chosen and rejected rows in one forward on both.
Pairs/s = pairs of every step but the first / seconds in those steps. Each side in its own process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (DTYPE, GPU, PACKING, SUMMARY, after_warmup, compare_row, in_child, keep_known, memory_unit,
                    ours_steps, pair_args, prepare_pairs, profiler_of, reset_memory, run_ours, trl_common, trl_timer,
                    write_outputs)


def ours(spec: dict) -> dict:
    recipe = {"output_dir": spec["out"], "seed": 0,
              "model": {"name_or_path": spec["model"], "gradient_checkpointing": spec["checkpointing"],
                        "dtype": DTYPE}, "lora": None,
              "data": {"train": spec["data"], "template": "alpaca", "max_len": spec["max_len"],
                       "max_prompt_len": spec["max_len"] // 2, "packing": spec.get("packing", False)},
              "train": {"epochs": 1, "batch_size": spec["micro"], "micro_batch_size": spec["micro"], "lr": 1e-5,
                        "log_every": 1, "eval_every": 0, "save_every": 0, "report_to": []}}
    result = run_ours("rm", recipe, Path(spec["out"]), profiler_of(spec))
    return after_warmup(*ours_steps(result, per_step=spec["micro"]))


def trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from data_formats.templates import load_template

    template = load_template("alpaca")
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    data = Dataset.from_list([{"prompt": template.render(r["instruction"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in records])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1,
                                                               dtype=torch.bfloat16 if GPU else torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    config = keep_known(RewardConfig, **trl_common(Path(spec["out"]), spec["micro"]), num_train_epochs=1,
                        learning_rate=1e-5, max_length=spec["max_len"], gradient_checkpointing=spec["checkpointing"])
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    if len(trainer.train_dataset) != len(records):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(records)} pairs: unequal work")
    timer = trl_timer(trainer, profiler=profiler_of(spec), count=lambda inputs: inputs["input_ids"].shape[0] // 2)
    reset_memory()
    trainer.train()
    return after_warmup(timer.stamps, timer.work)


def rows_for(size: str, out: Path, args, packing_rows: list | None = None) -> list[dict]:
    """The summary row at one size; with a `packing_rows` list, ours again with padded rows (data.packing
    false) and a packed-vs-padded row appended to it."""
    spec = {**prepare_pairs(size, out, args.records, args.max_len), "micro": args.micro,
            "checkpointing": args.checkpointing, "profile": args.profile, "packing": args.packing}
    o = in_child("rm", "ours", {**spec, "out": str(out / f"rm-ours-{size}")})
    t = in_child("rm", "trl", {**spec, "out": str(out / f"rm-trl-{size}")})
    if packing_rows is not None and args.packing:
        padded = in_child("rm", "ours", {**spec, "packing": False, "profile": 0, "out": str(out / f"rm-padded-{size}")})
        packing_rows.append(compare_row(f"RM full ({size})", "pairs/s", o, padded, labels=PACKING))
    return [compare_row(f"RM full ({size})", "pairs/s", o, t)]


def add_args(p: argparse.ArgumentParser) -> None:
    pair_args(p)
    p.add_argument("--checkpointing", action="store_true")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    add_args(p)
    args = p.parse_args()
    if args.tiny:
        args.sizes, args.records, args.micro, args.max_len = "tiny", 64, 8, 256
    elif args.sizes == "small":
        args.records, args.micro, args.max_len = min(args.records, 192), 8, 256
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-rm-"))
    rows = [row for size in args.sizes.split(",") for row in rows_for(size, out, args)]
    print(write_outputs(rows, SUMMARY, args.json, f"peak memory: {memory_unit()}"))


if __name__ == "__main__":
    main()
