"""Reward-model throughput: TRL's RewardTrainer vs our `rm` stage, same model, pairs and batch.

    python bench/rm.py --sizes 270m,1b        # on the GPU
    python bench/rm.py --tiny                 # CPU smoke run

One epoch over the same preference pairs, full fine-tuning on both sides; pairs/s = pairs / seconds
spent in training steps. Printed: pairs/s, peak memory, ratio ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import (build_model, keep_known, pair_records, peak_memory, reset_memory, run_ours, step_timer, table,
                    write_jsonl)


def run_trl(model_dir: Path, records, template, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": template.render(r["instruction"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in records])
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    config = keep_known(RewardConfig, output_dir=str(out), per_device_train_batch_size=args.micro,
                        num_train_epochs=1, learning_rate=1e-5, max_length=args.max_len,
                        bf16=torch.cuda.is_available(), logging_steps=10 ** 9, save_strategy="no", report_to="none",
                        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=args.checkpointing)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok)

    timer = step_timer()
    trainer.add_callback(timer)
    reset_memory()
    trainer.train()
    return {"seconds": timer.seconds, "memory": peak_memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--records", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--max-len", dest="max_len", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.sizes, args.records, args.micro, args.max_len = "tiny", 64, 8, 256
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-rm-"))
    from data_formats.templates import load_template

    template = load_template("alpaca")
    records = pair_records(args.records)
    data = write_jsonl(out / "pairs.jsonl", records)
    rows = []
    for size in args.sizes.split(","):
        model_dir = build_model(size, out / f"model-{size}")
        recipe = {"output_dir": str(out / f"ours-{size}"), "seed": 0,
                  "model": {"name_or_path": str(model_dir), "gradient_checkpointing": args.checkpointing,
                            "dtype": "bfloat16" if torch.cuda.is_available() else "float32"}, "lora": None,
                  "data": {"train": str(data), "template": "alpaca", "max_len": args.max_len,
                           "max_prompt_len": args.max_len // 2},
                  "train": {"epochs": 1, "batch_size": args.micro, "micro_batch_size": args.micro, "lr": 1e-5,
                            "log_every": 1, "eval_every": 0, "save_every": 0}}
        ours = run_ours("rm", recipe, out)
        pairs = ours["manifest"]["data"]["train_records"]
        try:
            trl = run_trl(model_dir, records, template, args, out / f"trl-{size}")
        except Exception as err:
            trl = {"seconds": float("nan"), "memory": f"failed: {type(err).__name__}: {str(err)[:80]}"}
        ours_ps, trl_ps = pairs / ours["seconds"], pairs / trl["seconds"]
        rows.append({"model": size, "trainer": "ours", "pairs/s": f"{ours_ps:.1f}", "peak memory": ours["memory"],
                     "ours/TRL": f"{ours_ps / trl_ps:.2f}x" if trl_ps == trl_ps else "n/a"})
        rows.append({"model": size, "trainer": "TRL RewardTrainer", "pairs/s": f"{trl_ps:.1f}",
                     "peak memory": trl["memory"]})
    print(table(rows, ["model", "trainer", "pairs/s", "peak memory", "ours/TRL"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
