"""DPO throughput: TRL's DPOTrainer vs our `dpo` stage, same model, pairs, batch and LoRA, with and
without a precomputed reference.

    python bench/dpo.py --sizes 270m,1b       # on the GPU
    python bench/dpo.py --tiny                # CPU smoke run

One epoch over the same pairs; pairs/s = pairs / seconds in training steps, plus the reference
pre-pass when it is precomputed (on both sides). Printed: pairs/s, peak memory, ratio ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import (build_model, keep_known, pair_records, peak_memory, reset_memory, run_ours, step_timer, sync, table,
                    write_jsonl)


def run_trl(model_dir: Path, records, template, args, precompute: bool, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": template.render(r["instruction"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in records])
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = keep_known(DPOConfig, output_dir=str(out), per_device_train_batch_size=args.micro, num_train_epochs=1,
                        learning_rate=5e-6, beta=0.1, max_length=args.max_len, max_prompt_length=args.max_len // 2,
                        precompute_ref_log_probs=precompute, bf16=torch.cuda.is_available(), logging_steps=10 ** 9,
                        save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    timer = step_timer()
    trainer.add_callback(timer)
    reset_memory()
    began = sync()
    trainer.train()  # the reference pre-pass (precompute_ref_log_probs) runs before the first step
    before_first_step = (timer.first - began) if precompute else 0.0
    return {"seconds": timer.seconds + before_first_step, "memory": peak_memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--records", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--max-len", dest="max_len", type=int, default=1024)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.sizes, args.records, args.micro, args.max_len = "tiny", 64, 8, 256
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    from data_formats.templates import load_template

    template = load_template("alpaca")
    records = pair_records(args.records)
    data = write_jsonl(out / "pairs.jsonl", records)
    rows = []
    for size in args.sizes.split(","):
        model_dir = build_model(size, out / f"model-{size}")
        for precompute in (False, True):
            recipe = {"output_dir": str(out / f"ours-{size}-{precompute}"), "seed": 0,
                      "model": {"name_or_path": str(model_dir),
                                "dtype": "bfloat16" if torch.cuda.is_available() else "float32"},
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                      "data": {"train": str(data), "template": "alpaca", "max_len": args.max_len,
                               "max_prompt_len": args.max_len // 2},
                      "train": {"epochs": 1, "batch_size": args.micro, "micro_batch_size": args.micro, "lr": 5e-6,
                                "log_every": 1, "eval_every": 0, "save_every": 0},
                      "dpo": {"beta": 0.1, "precompute_ref": precompute}}
            ours = run_ours("dpo", recipe, out)
            # with precompute, the reference pre-pass counts too on both sides
            seconds = ours["seconds"] + ours["manifest"]["metrics"]["time/precompute_ref_s"]
            pairs = ours["manifest"]["data"]["train_records"]
            try:
                trl = run_trl(model_dir, records, template, args, precompute, out / f"trl-{size}-{precompute}")
            except Exception as err:
                trl = {"seconds": float("nan"), "memory": f"failed: {type(err).__name__}: {str(err)[:80]}"}
            ours_ps, trl_ps = pairs / seconds, pairs / trl["seconds"]
            ref = "precomputed" if precompute else "live (adapter off)"
            rows.append({"model": size, "reference": ref, "trainer": "ours", "pairs/s": f"{ours_ps:.1f}",
                         "peak memory": ours["memory"],
                         "ours/TRL": f"{ours_ps / trl_ps:.2f}x" if trl_ps == trl_ps else "n/a"})
            rows.append({"model": size, "reference": ref, "trainer": "TRL DPOTrainer", "pairs/s": f"{trl_ps:.1f}",
                         "peak memory": trl["memory"]})
    print(table(rows, ["model", "reference", "trainer", "pairs/s", "peak memory", "ours/TRL"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
