"""Data preparation at scale: our `sft` stage vs TRL's SFTTrainer on the same synthetic Alpaca-like records.

    python bench/data.py --records 200000             # the table in bench/README.md
    python bench/data.py --records 2000 --quick       # a smoke run (one num_proc, no two-process row)

Each measurement is one fresh process (one thread: OMP/MKL/RAYON at 1, TOKENIZERS_PARALLELISM off) that
reads the records, prepares them and trains one step of the ~17M-parameter `small` bench model (full
fine-tuning, micro-batch 8, max_len 512): the wall time to the end of that step (imports and model load
included, the same on both sides) and the process's peak RSS. Ours reads the Alpaca JSONL and caches its
tokenized examples under its own RLHF_DATA_CACHE; TRL reads the same records as prompt/completion JSONL
with `datasets.load_dataset("json")` and tokenizes with `Dataset.map` into its own HF_DATASETS_CACHE. The
first run starts from an empty cache, the second reuses it; `num_proc` is `data.num_proc` for ours and
`dataset_num_proc` for TRL. The two-process rows run `accelerate launch --num_processes 2` (CPU, gloo) on a
warm cache and report each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

MAX_LEN, MICRO = 512, 8
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def write_data(out: Path, records: int) -> tuple[Path, Path]:
    """The same records twice: Alpaca JSONL (ours) and prompt/completion JSONL rendered with the Alpaca
    template (TRL's native format)."""
    from common import alpaca_records

    from data_formats.templates import load_template

    alpaca, pc = out / f"alpaca-{records}.jsonl", out / f"prompt-completion-{records}.jsonl"
    if not alpaca.is_file():
        template = load_template("alpaca")
        rows = alpaca_records(records, prompt_words=40, response_words=90, cap=200)
        with open(alpaca, "w") as a, open(pc, "w") as p:
            for r in rows:
                a.write(json.dumps(r) + "\n")
                p.write(json.dumps({"prompt": template.render(r["instruction"], r["input"]),
                                    "completion": r["output"]}) + "\n")
    return alpaca, pc


# --- one side, in its own process ---------------------------------------------------------------------------


def ours(spec: dict) -> None:
    import yaml

    from rlhf.recipes import load_recipe
    from stages import sft

    recipe = {"stage": "sft", "output_dir": spec["out"], "seed": 0,
              "model": {"name_or_path": spec["model"]}, "lora": None,
              "data": {"train": spec["alpaca"], "template": "alpaca", "max_len": MAX_LEN,
                       "num_proc": spec["num_proc"], "cache_dir": spec["cache"]},
              "train": {"epochs": 1, "max_steps": 1, "batch_size": MICRO, "micro_batch_size": MICRO, "lr": 1e-4,
                        "log_every": 1, "eval_every": 0, "save_every": 0, "report_to": []},
              "samples": 0}
    path = Path(spec["out"] + ".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    sft.run(load_recipe(path, "sft"))


def trl(spec: dict) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from common import keep_known

    data = datasets.load_dataset("json", data_files=spec["pc"], split="train", cache_dir=spec["cache"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    config = keep_known(SFTConfig, output_dir=spec["out"], per_device_train_batch_size=MICRO, max_steps=1,
                        learning_rate=1e-4, logging_steps=10 ** 9, save_strategy="no", report_to="none",
                        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, max_length=MAX_LEN,
                        dataset_num_proc=spec["num_proc"], completion_only_loss=True)
    SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok).train()


def child(spec_file: str) -> None:
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    if spec["side"] == "trl":  # datasets' own cache folder, as a TRL user has it
        os.environ["HF_DATASETS_CACHE"] = spec["cache"]
    started = time.perf_counter()
    (ours if spec["side"] == "ours" else trl)(spec)
    rank = os.environ.get("RANK", "0")
    Path(f"{spec['result']}.{rank}").write_text(json.dumps({
        "s": time.perf_counter() - started, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))


# --- the runs -------------------------------------------------------------------------------------------------


def measure(spec: dict, work: Path, processes: int = 1) -> dict:
    """Run one side as a fresh process (or `processes` under accelerate launch); wall seconds from the
    launch to the end of the step, and each process's peak RSS."""
    spec_file = work / f"{spec['name']}.json"
    spec["result"] = str(work / f"{spec['name']}.result")
    spec_file.write_text(json.dumps(spec))
    for old in work.glob(f"{spec['name']}.result.*"):
        old.unlink()
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH")]))}
    if spec["side"] == "ours":
        env["RLHF_DATA_CACHE"] = spec["cache"]
    cmd = [sys.executable, str(Path(__file__)), "child", str(spec_file)]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *cmd[1:]]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        return {"error": "over 20 minutes"}
    wall = time.perf_counter() - started
    (work / f"{spec['name']}.log").write_text(proc.stdout)
    results = [json.loads(p.read_text()) for p in sorted(work.glob(f"{spec['name']}.result.*"))]
    if proc.returncode or len(results) != processes:
        tail = [x for x in proc.stdout.splitlines() if x.strip()][-1:] or [f"exit {proc.returncode}"]
        return {"error": tail[0][:200]}
    return {"s": wall, "peak_gb": [r["peak_gb"] for r in results]}


def cell(r: dict, key: str) -> str:
    if "error" in r:
        return "error: " + r["error"]
    if key == "s":
        return f"{r['s']:.1f}"
    return " / ".join(f"{g:.2f}" for g in r["peak_gb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--num-proc", dest="num_proc", default="1,2")
    p.add_argument("--quick", action="store_true", help="one num_proc, no two-process row")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from common import build_model

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-data-"))
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("small", out / "model-small")
    alpaca, pc = write_data(out, args.records)
    print(f"{args.records} records, {alpaca.stat().st_size / 1e6:.0f} MB of JSONL; runs in {out}", file=sys.stderr)
    rows = []
    for num_proc in [int(n) for n in args.num_proc.split(",")][: 1 if args.quick else None]:
        results = {}
        for side in ("ours", "trl"):  # interleaved per num_proc: both sides see the same machine load
            cache = out / f"cache-{side}-{num_proc}"
            shutil.rmtree(cache, ignore_errors=True)
            spec = {"side": side, "model": str(model), "alpaca": str(alpaca), "pc": str(pc), "num_proc": num_proc,
                    "cache": str(cache)}
            results[side] = [measure({**spec, "name": f"{side}-{num_proc}-{run}",
                                      "out": str(out / f"run-{side}-{num_proc}-{run}")}, out)
                             for run in ("first", "second")]
            print(side, num_proc, results[side], file=sys.stderr)
        for side, name in (("ours", "ours"), ("trl", "TRL SFTTrainer")):
            first, second = results[side]
            rows.append([name, str(num_proc), cell(first, "s"), cell(second, "s"), cell(first, "peak"),
                         cell(second, "peak")])
    if not args.quick:  # two processes on the warm num_proc=1 caches: each one's peak RSS
        for side, name in (("ours", "ours"), ("trl", "TRL SFTTrainer")):
            spec = {"side": side, "model": str(model), "alpaca": str(alpaca), "pc": str(pc), "num_proc": 1,
                    "cache": str(out / f"cache-{side}-1"), "out": str(out / f"run-{side}-2proc"),
                    "name": f"{side}-2proc"}
            r = measure(spec, out, processes=2)
            print(side, "2 processes", r, file=sys.stderr)
            rows.append([f"{name}, 2 processes", "1", "", cell(r, "s"), "", cell(r, "peak")])
    head = ["", "num_proc", "first run (s)", "second run (s)", "peak RSS first (GB)", "peak RSS second (GB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        child(sys.argv[2])
    else:
        main()
