"""DPO throughput: TRL's DPOTrainer vs our `dpo` stage, same model, pairs, batch and LoRA, with the
reference live (the policy with its adapter off, every step) or precomputed (one pass before training).

    python bench/dpo.py --sizes 270m,1b       # on the GPU
    python bench/dpo.py --sizes small         # CPU, ~17M parameters (part of `bench/suite.py --cpu`)
    python bench/dpo.py --tiny                # CPU smoke run

One epoch over the same pairs (each fits `max_len`). Pairs/s = pairs of every step but the first / the
seconds of those steps; with a precomputed reference, the seconds of the reference pass over all pairs,
prorated to those pairs, are added on both sides (TRL runs that pass inside `DPOTrainer.__init__`, ours
before the first step). Each side in its own process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (DTYPE, GPU, PACKING, SUMMARY, after_warmup, compare_row, in_child, keep_known, memory_unit,
                    ours_steps, pair_args, prepare_pairs, profiler_of, reset_memory, run_ours, stamp, trl_common,
                    trl_timer, write_outputs)


def timed(owner, name: str, spent: list[float]):
    """Replace `owner.name` by a function that adds its (wall, CPU) seconds to `spent`."""
    fn = getattr(owner, name)

    def run(*args, **kwargs):
        began = stamp()
        try:
            return fn(*args, **kwargs)
        finally:
            ended = stamp()
            spent[0] += ended[0] - began[0]
            spent[1] += ended[1] - began[1]

    setattr(owner, name, run)


def charged(stamps, work, total: int, reference: list[float]) -> dict:
    """Rates over steps 2..N, charged their share (their pairs / all pairs) of the reference pass."""
    share = sum(work[1:]) / total
    out = after_warmup(stamps, work, (reference[0] * share, reference[1] * share))
    out["reference_s"] = reference[0]
    return out


def ours(spec: dict) -> dict:
    recipe = {"output_dir": spec["out"], "seed": 0, "model": {"name_or_path": spec["model"], "dtype": DTYPE},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
              "data": {"train": spec["data"], "template": "alpaca", "max_len": spec["max_len"],
                       "max_prompt_len": spec["max_len"] // 2, "packing": spec.get("packing", False)},
              "train": {"epochs": 1, "batch_size": spec["micro"], "micro_batch_size": spec["micro"], "lr": 5e-6,
                        "log_every": 1, "eval_every": 0, "save_every": 0, "report_to": []},
              "dpo": {"beta": 0.1, "precompute_ref": spec["precompute"]}}
    import stages.dpo

    reference = [0.0, 0.0]
    timed(stages.dpo, "precompute_reference", reference)
    result = run_ours("dpo", recipe, Path(spec["out"]), profiler_of(spec))
    return charged(*ours_steps(result, per_step=spec["micro"]), result["manifest"]["data"]["train_records"], reference)


def trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from data_formats.templates import load_template

    template = load_template("alpaca")
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    data = Dataset.from_list([{"prompt": template.render(r["instruction"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in records])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if GPU else torch.float32)
    config = keep_known(DPOConfig, **trl_common(Path(spec["out"]), spec["micro"]), num_train_epochs=1,
                        learning_rate=5e-6, beta=0.1, max_length=spec["max_len"],
                        precompute_ref_log_probs=spec["precompute"])
    reference = [0.0, 0.0]
    timed(DPOTrainer, "_precompute_ref_logps", reference)  # TRL runs the reference pass inside __init__
    reset_memory()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    if len(trainer.train_dataset) != len(records):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(records)} pairs: unequal work")
    timer = trl_timer(trainer, profiler=profiler_of(spec), count=lambda inputs: inputs["input_ids"].shape[0] // 2)
    trainer.train()
    return charged(timer.stamps, timer.work, len(records), reference)


def rows_for(size: str, out: Path, args, packing_rows: list | None = None) -> list[dict]:
    """Summary rows (live and precomputed reference) at one size; with a `packing_rows` list, ours with the
    live reference again with padded rows (data.packing false) and a packed-vs-padded row appended to it."""
    spec = {**prepare_pairs(size, out, args.records, args.max_len), "micro": args.micro, "profile": args.profile,
            "packing": args.packing}
    rows = []
    for precompute in (False, True):
        name = "precomputed" if precompute else "live"
        o = in_child("dpo", "ours", {**spec, "precompute": precompute, "out": str(out / f"dpo-ours-{size}-{name}")})
        t = in_child("dpo", "trl", {**spec, "precompute": precompute, "out": str(out / f"dpo-trl-{size}-{name}")})
        rows.append(compare_row(f"DPO LoRA, {name} reference ({size})", "pairs/s", o, t))
        if packing_rows is not None and args.packing and not precompute:
            padded = in_child("dpo", "ours", {**spec, "precompute": False, "packing": False, "profile": 0,
                                              "out": str(out / f"dpo-padded-{size}-{name}")})
            packing_rows.append(compare_row(f"DPO LoRA, {name} reference ({size})", "pairs/s", o, padded,
                                            labels=PACKING))
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    pair_args(p)


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
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    rows = [row for size in args.sizes.split(",") for row in rows_for(size, out, args)]
    print(write_outputs(rows, SUMMARY, args.json, f"peak memory: {memory_unit()}"))


if __name__ == "__main__":
    main()
