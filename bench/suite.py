"""Every benchmark in one command, one summary table: SFT (LoRA, full), RM, DPO (live and precomputed
reference) and RL (GRPO, RLOO, PPO with its critic) against TRL at equal settings, then our PPO phases
and the rollout engines.

    python bench/suite.py --cpu                      # ~17M-parameter Llama on the CPU (2 cores: < 20 minutes)
    python bench/suite.py --sizes 270m,1b --json X   # on a GPU (bench/gpu.sh runs this)

Each measurement is its own process (see bench/common.py): rates after a warm-up step, peak memory of
that process. The table: row, ours, TRL, ours/TRL, each side's peak memory (and, on the CPU, the ratio of
rates per CPU second, the steadier figure on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import dpo
import ppo
import rm
import sft
from common import GPU, PACKING, SUMMARY, columns, memory_unit, table


def run(sizes: list[str], out: Path, args) -> dict:
    """All rows at `sizes` (the RL rows and phases at the first size only); returns the tables."""
    started = time.perf_counter()
    summary, packing, phases, rollout = [], [], [], []
    for size in sizes:
        for name, module in (("sft", sft), ("rm", rm), ("dpo", dpo)):
            if name in args.only:
                extra = {"packing_rows": packing} if name != "sft" and "packing" in args.only else {}
                rows = module.rows_for(size, out, args.per[name], **extra)
                summary += rows
                print(table(rows, SUMMARY), file=sys.stderr, flush=True)
    if "ppo" in args.only:
        s, phases, rollout = ppo.rows_for(args.ppo_size or sizes[0], out, args.per["ppo"])
        summary += s
    return {"summary": summary, "packing": packing, "phases": phases, "rollout": rollout,
            "seconds": time.perf_counter() - started}


def settings(size: str, cpu: bool) -> dict[str, argparse.Namespace]:
    """Per-benchmark settings: the GPU defaults of each script, or the small CPU ones."""
    per = {}
    for name, module in (("sft", sft), ("rm", rm), ("dpo", dpo), ("ppo", ppo)):
        p = argparse.ArgumentParser()
        module.add_args(p)
        per[name] = p.parse_args([])
    if cpu:
        for name in ("sft", "rm", "dpo"):
            per[name].records, per[name].micro, per[name].max_len = 192, 8, 256
        ppo.small(per["ppo"])
    if size == "tiny":
        for name in ("sft", "rm", "dpo"):
            per[name].records, per[name].micro, per[name].max_len = 32, 8, 128
        ppo.small(per["ppo"])
        per["ppo"].iterations, per["ppo"].new, per["ppo"].decode_repeats = 3, 16, 2
    return per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the small size on the CPU, in one table")
    p.add_argument("--tiny", action="store_true", help="smoke run: the tiny size, a few steps each")
    p.add_argument("--sizes", default="270m,1b")
    p.add_argument("--ppo-size", dest="ppo_size", default=None, help="size of the RL rows (default: the first)")
    p.add_argument("--only", default="sft,rm,dpo,packing,ppo", help="benchmarks to run (packing: our rm and dpo "
                   "again with padded rows, data.packing false)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of sft, rm and dpo (records = steps x micro)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every measurement (OMP_NUM_THREADS); "
                        "with 1, the CPU-seconds ratios hold on a loaded machine")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children inherit it
    if args.cpu or args.tiny:
        args.sizes = "tiny" if args.tiny else "small"
    sizes = args.sizes.split(",")
    args.per = settings(sizes[0], args.cpu)
    if args.steps:
        for name in ("sft", "rm", "dpo"):
            args.per[name].records = args.steps * args.per[name].micro
    args.only = args.only.split(",")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-suite-"))
    result = run(sizes, out, args)
    ppo_args = args.per["ppo"]
    text = "\n".join([
        f"peak memory: {memory_unit()}; {result['seconds'] / 60:.1f} minutes",
        table(result["summary"], SUMMARY), "",
        "ours with data.packing true (the rows above) vs false (padded rows, one sequence per row):",
        table(result["packing"], columns(PACKING)), "",
        f"our phases, seconds per iteration ({ppo_args.prompts} prompts x k={ppo_args.k}, {ppo_args.new} new tokens):",
        table(result["phases"], ["estimator", "generate", "score", "ref_values", "update", "iteration s",
                                 "rollout tok/s"]), "",
        f"rollout engines, batch {ppo_args.prompts * ppo_args.k}, {ppo_args.new} new tokens, "
        f"{'GPU' if GPU else 'CPU'}:",
        table(result["rollout"], ["engine", "tokens/s (median)", "vs dynamic", "per repeat"])])
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
