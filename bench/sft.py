"""SFT throughput: TRL's SFTTrainer vs our `sft` stage, same model, records, batch, LoRA and precision.

    python bench/sft.py --sizes 270m,1b          # on the GPU
    python bench/sft.py --sizes small            # CPU, ~17M parameters (part of `bench/suite.py --cpu`)
    python bench/sft.py --tiny                   # CPU smoke run (a few steps, tiny model)

Both train one epoch over the same Alpaca-like records (lognormal lengths, every record fits `max_len`)
on response tokens only. TRL packs with best-fit decreasing into padding-free rows; ours packs each
micro-batch into rows of about twice its longest example. Trained tokens/s = response tokens (incl. EOS)
of every step but the first / seconds in those steps; each side counts its own steps' tokens (TRL: labels != -100 of the
step's batches). Each side runs in its own process; peak memory is that process's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (DTYPE, GPU, H100_BF16_FLOPS, SUMMARY, after_warmup, alpaca_records, build_model, compare_row,
                    fit_records, in_child, keep_known, memory_unit, profiler_of, mfu, ours_steps, parameters,
                    reset_memory, run_ours, trl_common, trl_timer, write_jsonl, write_outputs)


def ours(spec: dict) -> dict:
    """Our sft stage on spec's model and records; trained tokens/s after the first step."""
    recipe = {"output_dir": spec["out"], "seed": 0,
              "model": {"name_or_path": spec["model"], "dtype": DTYPE,
                        "gradient_checkpointing": spec["checkpointing"]},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0} if spec["lora"] else None,
              "data": {"train": spec["data"], "template": "alpaca", "max_len": spec["max_len"], "packing": True},
              "train": {"epochs": 1, "batch_size": spec["micro"], "micro_batch_size": spec["micro"], "lr": 2e-4,
                        "log_every": 1, "eval_every": 0, "save_every": 0, "warmup_ratio": 0.03,
                        "report_to": []},
              "samples": 0}
    result = run_ours("sft", recipe, Path(spec["out"]), profiler_of(spec))
    return after_warmup(*ours_steps(result, "perf/trained_tokens_per_s"))


def trl(spec: dict) -> dict:
    import json

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from data_formats.templates import load_template

    template = load_template("alpaca")
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    data = Dataset.from_list([{"prompt": template.render(r["instruction"], r["input"]), "completion": r["output"]}
                              for r in records])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if GPU else torch.float32)
    rows = max(1, round(spec["micro"] * spec["mean_len"] / spec["max_len"]))  # packed rows holding ~micro examples
    config = keep_known(SFTConfig, **trl_common(Path(spec["out"]), rows), gradient_accumulation_steps=1,
                        num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03,
                        max_length=spec["max_len"], packing=True, packing_strategy="bfd", padding_free=True,
                        completion_only_loss=True, gradient_checkpointing=spec["checkpointing"])
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") if spec["lora"] else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=peft)
    timer = trl_timer(trainer, profiler=profiler_of(spec), count=lambda inputs: (inputs["labels"] != -100).sum())
    reset_memory()
    trainer.train()
    return after_warmup(timer.stamps, timer.work)


def prepare(size: str, out: Path, records: int, max_len: int) -> dict:
    """Model folder and records (fitted to max_len) of one size; returns the spec both sides share."""
    from transformers import AutoTokenizer

    from data_formats.templates import load_template

    model_dir = build_model(size, out / f"model-{size}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = fit_records(alpaca_records(records, prompt_words=max_len * 0.12, response_words=max_len * 0.3,
                                      cap=max_len // 2), tok, max_len)
    template = load_template("alpaca")
    prompts = sum(len(tok(template.render(r["instruction"], r["input"]))["input_ids"]) for r in rows)
    trained = sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    data = write_jsonl(out / f"alpaca-{size}.jsonl", rows)
    return {"model": str(model_dir), "data": str(data), "max_len": max_len, "mean_len": (prompts + trained) / len(rows),
            "all_per_trained": (prompts + trained) / trained}


def rows_for(size: str, out: Path, args) -> list[dict]:
    """Summary rows (SFT LoRA and full) at one size; on a GPU with MFU (6·N·all tokens/s over the peak)."""
    shared = prepare(size, out, args.records, args.max_len)
    rows = []
    for lora in (True, False):
        mode = "LoRA r=16" if lora else "full"
        spec = {**shared, "lora": lora, "micro": args.micro, "checkpointing": args.checkpointing,
                "profile": args.profile}
        o = in_child("sft", "ours", {**spec, "out": str(out / f"ours-{size}-{mode[:4]}")})
        t = in_child("sft", "trl", {**spec, "out": str(out / f"trl-{size}-{mode[:4]}")})
        row = compare_row(f"SFT {mode} ({size})", "trained tok/s", o, t, 0)
        for side, r in (("ours", o), ("TRL", t)):
            row[f"MFU {side}"] = mfu(parameters(size), r.get("rate", 0.0) * shared["all_per_trained"],
                                     args.peak_flops)
        rows.append(row)
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many steps after the first, "
                   "both sides; tables in <out>/*.profile.txt")
    p.add_argument("--records", type=int, default=4096)
    p.add_argument("--micro", type=int, default=16, help="examples per micro-batch (ours)")
    p.add_argument("--max-len", dest="max_len", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_FLOPS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, a few steps")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    add_args(p)
    args = p.parse_args()
    if args.tiny:
        args.sizes, args.records, args.micro, args.max_len = "tiny", 64, 8, 256
    elif args.sizes == "small":
        args.records, args.micro, args.max_len = min(args.records, 192), 8, 256
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sft-"))
    rows = [row for size in args.sizes.split(",") for row in rows_for(size, out, args)]
    print(write_outputs(rows, SUMMARY + (["MFU ours", "MFU TRL"] if GPU else []), args.json,
                        f"peak memory: {memory_unit()}"))


if __name__ == "__main__":
    main()
