"""SFT throughput: TRL's SFTTrainer vs our `sft` stage, same model, data, batch, LoRA, one GPU.

    python bench/sft.py --sizes 270m,1b          # on the GPU
    python bench/sft.py --tiny                   # CPU smoke run (a few steps, tiny model)

Both train one epoch over the same Alpaca-like records (lognormal lengths) on response tokens only;
trained tokens/s = response tokens (incl. EOS) of the epoch / seconds spent in training steps.
TRL uses packing with best-fit decreasing (padding-free); ours packs each micro-batch into one
padding-free row. Printed: tokens/s, peak memory, MFU (6·N·all tokens/s), ratio ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import (H100_BF16_FLOPS, alpaca_records, build_model, keep_known, mfu, peak_memory, reset_memory,
                    run_ours, step_timer, table, write_jsonl)


def response_tokens(records, tokenizer, template) -> tuple[int, int]:
    """(response tokens incl. EOS, all tokens) of the records, as both trainers see them."""
    prompts = tokenizer([template.render(r["instruction"], r["input"]) for r in records])["input_ids"]
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    return sum(len(r) + 1 for r in responses), sum(len(p) + len(r) + 1 for p, r in zip(prompts, responses))


def run_trl(model_dir: Path, records, template, args, lora: bool, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": template.render(r["instruction"], r["input"]), "completion": r["output"]}
                              for r in records])
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    rows = max(1, round(args.micro * args.mean_len / args.max_len))  # packed rows holding ~micro examples
    config = keep_known(SFTConfig, output_dir=str(out / "trl"), per_device_train_batch_size=rows,
                        gradient_accumulation_steps=1, num_train_epochs=1, max_steps=args.max_steps or -1,
                        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03,
                        max_length=args.max_len, packing=True, packing_strategy="bfd", padding_free=True,
                        completion_only_loss=True, bf16=torch.cuda.is_available(),
                        gradient_checkpointing=args.checkpointing, logging_steps=10 ** 9, save_strategy="no",
                        report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") if lora else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft)

    timer = step_timer()
    trainer.add_callback(timer)
    reset_memory()
    trainer.train()
    return {"seconds": timer.seconds, "memory": peak_memory(), "steps": trainer.state.global_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, a few steps")
    p.add_argument("--records", type=int, default=4096)
    p.add_argument("--micro", type=int, default=16, help="examples per micro-batch (ours)")
    p.add_argument("--max-len", dest="max_len", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_FLOPS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.sizes, args.records, args.micro, args.max_len = "tiny", 64, 8, 256
    args.max_steps = None
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sft-"))
    from data_formats.templates import load_template
    from transformers import AutoTokenizer

    template = load_template("alpaca")
    records = alpaca_records(args.records, cap=args.max_len // 4)
    data = write_jsonl(out / "alpaca.jsonl", records)
    rows = []
    for size in args.sizes.split(","):
        model_dir = build_model(size, out / f"model-{size}")
        tok = AutoTokenizer.from_pretrained(model_dir)
        trained, total = response_tokens(records, tok, template)
        args.mean_len = total / len(records)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            model_dir).parameters())
        for lora in (True, False):
            mode = "LoRA r=16" if lora else "full"
            recipe = {"output_dir": str(out / f"ours-{size}-{mode[:4]}"), "seed": 0,
                      "model": {"name_or_path": str(model_dir), "dtype": "bfloat16" if torch.cuda.is_available()
                                else "float32", "gradient_checkpointing": args.checkpointing},
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.0} if lora else None,
                      "data": {"train": str(data), "template": "alpaca", "max_len": args.max_len, "packing": True},
                      "train": {"epochs": 1, "batch_size": args.micro, "micro_batch_size": args.micro, "lr": 2e-4,
                                "log_every": 1, "eval_every": 0, "save_every": 0, "warmup_ratio": 0.03},
                      "samples": 0}
            ours = run_ours("sft", recipe, out)
            try:
                trl = run_trl(model_dir, records, template, args, lora, out / f"trl-{size}-{mode[:4]}")
            except Exception as err:  # a TRL version that cannot run here: say why instead of crashing
                trl = {"seconds": float("nan"), "memory": f"failed: {type(err).__name__}: {str(err)[:80]}"}
            ours_tps, trl_tps = trained / ours["seconds"], trained / trl["seconds"]
            for name, r, tps in (("ours", ours, ours_tps), ("TRL SFTTrainer", trl, trl_tps)):
                rows.append({"model": size, "mode": mode, "trainer": name, "trained tok/s": f"{tps:,.0f}",
                             "peak memory": r["memory"], "MFU": mfu(n_params, tps * total / trained, args.peak_flops),
                             "ours/TRL": f"{ours_tps / trl_tps:.2f}x" if name == "ours" and trl_tps == trl_tps else ""})
    columns = ["model", "mode", "trainer", "trained tok/s", "peak memory", "MFU", "ours/TRL"]
    print(table(rows, columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
