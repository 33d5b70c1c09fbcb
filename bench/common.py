"""Shared pieces of the benchmarks: random-init Llama models, synthetic data that fits, one process per
measurement, timing, memory, tables.

Both sides of every comparison get the same model folder, the same records (each fits `max_len` tokens,
so neither side truncates or drops any) and the same batch, micro-batch, LoRA and precision settings.
Every measurement runs in its own Python process (`in_child`), so its peak memory is its own:
`resource.getrusage(RUSAGE_SELF).ru_maxrss` on CPU (the whole process: imports, model, training), or
`torch.cuda.max_memory_allocated()` since the start of training on a GPU. Throughput is taken after a
warm-up: the first training step (or PPO iteration) is run but neither timed nor counted, on both sides.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 4, 4, 176, 512),
    "small": (384, 6, 6, 6, 1024, 8000),  # ~17M parameters: compute-bound on CPU, minutes on 2 cores
    "270m": (1024, 16, 16, 8, 2816, 32000),
    "1b": (2048, 16, 32, 8, 5632, 32000),
}
H100_BF16_FLOPS = 989e12
GPU = torch.cuda.is_available()
DTYPE = "bfloat16" if GPU else "float32"


# ---------------------------------------------------------------------------------------------
# models and data


WORDS = ("the model data train reward policy value token answer question list sort reverse number letter "
         "write explain short long first last simple which when where because example result").split()
# the Alpaca template's own words, so that the tokenizer does not spell the prompt header byte by byte
TEMPLATE_TEXT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                 "\n\n### Input:\n\n\n### Response:\n")


def build_model(size: str, folder: Path, seq_cls: bool = False) -> Path:
    """A random-init Llama (and a byte-level BPE trained on synthetic text) saved as an HF folder; an
    existing folder is reused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = synthetic_text(2000) if size == "tiny" else synthetic_text(20000, extra=vocab // 2)
    tok.train_from_iterator(corpus + [TEMPLATE_TEXT] * 2000, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|pad|>")
    hf_tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=2048, pad_token_id=hf_tok.pad_token_id,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, num_labels=1)
    torch.manual_seed(0)
    model = (LlamaForSequenceClassification if seq_cls else LlamaForCausalLM)(config)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"model {size}: {n / 1e6:.1f}M parameters, vocab {len(hf_tok)} -> {folder}", file=sys.stderr)
    return folder


def parameters(size: str) -> int:
    """Parameters of a size's causal LM (untied embeddings)."""
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    return 2 * vocab * hidden + layers * (attention + 3 * hidden * inter + 2 * hidden) + hidden


def synthetic_text(n: int, seed: int = 0, extra: int = 0) -> list[str]:
    """Lines of WORDS, mixed with `extra` made-up words (3-10 letters) so that a tokenizer trained on them
    can reach a large vocabulary."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
               for _ in range(extra)]
    pool = WORDS * 100 + made_up  # the words records are made of stay whole tokens
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def lengths(rng: random.Random, mean: float, cap: int) -> int:
    """Alpaca-like lengths: lognormal with the given mean (sigma 0.7), at least 4 words."""
    sigma = 0.7
    return max(4, min(cap, int(rng.lognormvariate(math.log(mean) - sigma ** 2 / 2, sigma))))


def alpaca_records(n: int, prompt_words: float = 60, response_words: float = 90, cap: int = 400,
                   seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"instruction": say(lengths(rng, prompt_words, cap)), "input": "",
             "output": say(lengths(rng, response_words, cap))} for _ in range(n)]


def pair_records(n: int, prompt_words: float = 60, response_words: float = 90, cap: int = 400,
                 seed: int = 0) -> list[dict]:
    rows = alpaca_records(n, prompt_words, response_words, cap, seed=seed)
    rng = random.Random(seed + 1)
    return [{"instruction": r["instruction"], "chosen": r["output"],
             "rejected": " ".join(rng.sample(r["output"].split(), len(r["output"].split())))} for r in rows]


def fit_records(records: list[dict], tokenizer, max_len: int, margin: int = 4) -> list[dict]:
    """The records shortened (whole words off the end) until the prompt (with BOS) fits half of
    `max_len - margin` tokens and prompt + response + EOS all of it, so that no trainer truncates or drops
    any of them (ours cut prompts at `max_prompt_len = max_len // 2`); pairs shorten chosen and rejected alike."""
    from data_formats.templates import load_template

    template = load_template("alpaca")
    budget = max_len - margin

    def count(text: str, special: bool = False) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    def shorten(text: str, fits) -> str:
        words = text.split()
        while len(words) > 1 and not fits(" ".join(words)):
            words = words[:-max(1, len(words) // 16)]
        return " ".join(words)

    out = []
    for r in records:
        r = dict(r)
        r["instruction"] = shorten(r["instruction"],
                                   lambda x: count(template.render(x, r.get("input", "")), True) <= budget // 2)  # noqa: B023 (called in this iteration)
        prompt = count(template.render(r["instruction"], r.get("input", "")), True)
        for side in ("output", "chosen", "rejected"):
            if side in r:
                r[side] = shorten(r[side], lambda x: prompt + count(x) + 1 <= budget)  # noqa: B023 (called in this iteration)
        if "chosen" in r and r["chosen"] == r["rejected"]:
            continue
        out.append(r)
    return out


def prepare_pairs(size: str, out: Path, records: int, max_len: int) -> dict:
    """Model folder and preference pairs (fitted to max_len) of one size, shared by bench/rm.py and bench/dpo.py."""
    from transformers import AutoTokenizer

    model_dir = build_model(size, out / f"model-{size}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = fit_records(pair_records(records, prompt_words=max_len * 0.12, response_words=max_len * 0.3,
                                    cap=max_len // 2), tok, max_len)
    data = write_jsonl(out / f"pairs-{size}.jsonl", rows)
    return {"model": str(model_dir), "data": str(data), "max_len": max_len}


def pair_args(p) -> None:
    """The command-line options bench/rm.py and bench/dpo.py share."""
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="ours without data.packing (padded rows, as TRL)")
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many steps after the first, "
                   "both sides; tables in <out>/*.profile.txt")
    p.add_argument("--records", type=int, default=2048)
    p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch (= per step)")
    p.add_argument("--max-len", dest="max_len", type=int, default=1024)


def prompt_records(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(words))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# one process per measurement


def in_child(module: str, function: str, spec: dict, timeout: float | None = None) -> dict:
    """`bench/<module>.py:<function>(spec) -> dict` in a fresh Python process, plus that process's peak
    memory (`peak_gib`), wall and CPU seconds. Its output goes to `<spec['out']>.log` when the spec names an
    output folder; a failure comes back as {'error': the last line of its output}."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec, default=str))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH")]))}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / "common.py"), module, function, str(spec_file),
                               str(out_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if "out" in spec:
            Path(spec["out"] + ".log").parent.mkdir(parents=True, exist_ok=True)
            Path(spec["out"] + ".log").write_text(proc.stdout)
        if proc.returncode != 0 or not out_file.is_file():
            lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
            return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:200]}
        out = json.loads(out_file.read_text())
    out["wall_s"] = time.perf_counter() - started
    out["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def _child_main(module: str, function: str, spec_file: str, out_file: str) -> None:
    torch.manual_seed(0)
    fn = getattr(importlib.import_module(module), function)
    out = fn(json.loads(Path(spec_file).read_text()))
    out["peak_gib"] = peak_gib()
    Path(out_file).write_text(json.dumps(out))


def reset_memory() -> None:
    """The start of the measured part (GPU: the peak counter restarts; CPU RSS keeps its process maximum)."""
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    if GPU:
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def memory_unit() -> str:
    return "GiB allocated (GPU)" if GPU else "GiB RSS (process max)"


def sync() -> float:
    if GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


def stamp() -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process (all threads), peak memory so far in GiB): on a loaded
    machine the CPU seconds of a CPU run vary far less than the wall clock."""
    wall = sync()
    return wall, time.process_time(), peak_gib()


def mfu(params: int, tokens_per_s: float, peak: float) -> str:
    """Model FLOPs utilization with the 6·N·tokens convention (2N forward + 4N backward)."""
    if not GPU:
        return "n/a (CPU)"
    return f"{100 * 6 * params * tokens_per_s / peak:.1f}%"


# ---------------------------------------------------------------------------------------------
# timing: equal work after a warm-up step
#
# A step's time is the wall clock from the end of the previous step to the end of this one, on both
# sides: it includes fetching and collating the batch, the forward/backward passes, the optimizer step and
# the step's logging. The first step (compilation, allocator warm-up, caches) is neither timed nor counted.
# The process's CPU seconds over the same steps are kept too (`cpu_rate`): on a loaded CPU machine they
# are the steadier measure.


def after_warmup(stamps: list[tuple[float, float]], work: list[float], extra_s: tuple[float, float] = (0.0, 0.0)
                 ) -> dict:
    """Rates over steps 2..N from the (wall, CPU) stamps at the end of each step: {'rate': work per wall second,
    'cpu_rate': work per CPU second, ...}. `extra_s`: (wall, CPU) seconds charged on top (a reference pass)."""
    if len(stamps) < 2:
        raise RuntimeError(f"{len(stamps)} step(s): at least 2 are needed to time after a warm-up step")
    done = sum(work[1:])
    # the peak so far: up to the end of training, before saving (reported beside the process's peak)
    wall = stamps[-1][0] - stamps[0][0] + extra_s[0]
    cpu = stamps[-1][1] - stamps[0][1] + extra_s[1]
    return {"rate": done / wall, "cpu_rate": done / cpu, "work": done, "seconds": wall, "cpu_seconds": cpu,
            "steps": len(stamps) - 1, "training_peak_gib": stamps[-1][2]}


class StepProfiler:
    """torch.profiler over steps 2..1+n (`tick()` at the end of every step); the key_averages table, sorted by
    self CPU time (self CUDA time on a GPU), goes to `path`. n = 0: off."""

    def __init__(self, n: int = 0, path: str | None = None):
        self.n, self.path, self.ticks, self.prof = n, path, 0, None

    def tick(self) -> None:
        self.ticks += 1
        if not self.n:
            return
        if self.ticks == 1:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if GPU else [])
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        elif self.ticks == 1 + self.n and self.prof is not None:
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if GPU else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)
            Path(self.path).write_text(table)
            self.prof = None


def trl_timer(trainer, count=None, profiler: StepProfiler | None = None):
    """Stamp the end of every TRL optimizer step (a TrainerCallback) and add up each step's work:
    `count(inputs)` over the step's micro-batches (`training_step` calls). Returns the timer (`.stamps`,
    `.work`)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps, self.work, self.pending = [], [], 0.0

        def on_step_end(self, *a, **k):
            self.stamps.append(stamp())
            self.work.append(self.pending)
            self.pending = 0.0
            if profiler is not None:
                profiler.tick()

    timer = StepTimer()
    trainer.add_callback(timer)
    if count is not None:
        step = trainer.training_step

        def counted(model, inputs, *args, **kwargs):
            timer.pending += float(count(inputs))
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = counted
    return timer


def keep_known(cls, **kwargs):
    """Build a (TRL) config dataclass from the kwargs its version knows (fields differ across releases)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def trl_common(out: Path, micro: int) -> dict:
    """TrainingArguments both TRL trainers of a row share: no logging, saving, reporting or workers."""
    return dict(output_dir=str(out), per_device_train_batch_size=micro, bf16=GPU, logging_steps=10 ** 9,
                save_strategy="no", report_to="none", use_cpu=not GPU, dataloader_num_workers=0, seed=0,
                disable_tqdm=True)


def run_ours(stage: str, recipe: dict, folder: Path, profiler: StepProfiler | None = None) -> dict:
    """Run one of our stages from a recipe dict (in this process); returns its metrics lines, manifest and the
    wall-clock stamp of every logged line (`train.log_every: 1`: the end of every step or PPO iteration)."""
    import yaml

    from rlhf.recipes import load_recipe
    from rlhf.scaffold import Scaffold

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, **recipe}, sort_keys=False))
    stages = __import__(f"stages.{stage}", fromlist=["run"])
    stamps, log = [], Scaffold.log

    def stamped(self, step, metrics, progress=None):
        log(self, step, metrics, progress)
        stamps.append(stamp())
        if profiler is not None:
            profiler.tick()

    Scaffold.log = stamped
    reset_memory()
    try:
        out = stages.run(load_recipe(path, stage))
    finally:
        Scaffold.log = log
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    if len(stamps) != len(lines):
        raise RuntimeError(f"{len(stamps)} stamps for {len(lines)} metrics lines: log every step, nothing else")
    return {"lines": lines, "stamps": stamps, "manifest": json.loads((out / "manifest.json").read_text())}


def profiler_of(spec: dict) -> StepProfiler:
    """The spec's profiler: `profile` steps after the first, the table in `<out>.profile.txt`."""
    return StepProfiler(spec.get("profile", 0), spec["out"] + ".profile.txt")


def ours_steps(result: dict, work_key: str | None = None, per_step: float = 0.0) -> tuple[list, list]:
    """(stamps, work) per training step of `run_ours`'s result: work is the step's `work_key` rate × its
    seconds, or `per_step` when constant."""
    steps = [(x, t) for x, t in zip(result["lines"], result["stamps"]) if "perf/step_time_s" in x]
    work = [x[work_key] * x["perf/step_time_s"] if work_key else per_step for x, _ in steps]
    return [t for _, t in steps], work


# ---------------------------------------------------------------------------------------------
# tables


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if ours == ours and theirs == theirs and theirs > 0 else "n/a"


def rate(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}" if x == x else "failed"


def gib(result: dict) -> str:
    """Peak memory at the end of the last training step (our stages then save and verify their artifact,
    which the TRL runs here do not), else the process's."""
    peak = result.get("training_peak_gib", result.get("peak_gib"))
    return f"{peak:.2f}" if peak is not None else "n/a"


def compare_row(name: str, unit: str, ours: dict, theirs: dict, digits: int = 1,
                labels: tuple[str, str] = ("ours", "TRL")) -> dict:
    """One row of the summary table from two child results that carry `rate` (columns: `columns(labels)`)."""
    a, b = labels
    o, t = ours.get("rate", float("nan")), theirs.get("rate", float("nan"))
    row = {"row": name, "unit": unit, a: rate(o, digits), b: rate(t, digits), f"{a}/{b}": ratio(o, t),
           f"{a} peak": gib(ours), f"{b} peak": gib(theirs),
           f"{a}/{b} by CPU s": ratio(ours.get("cpu_rate", float("nan")), theirs.get("cpu_rate", float("nan")))}
    for side, r in ((a, ours), (b, theirs)):
        if "error" in r:
            row[side] = f"failed: {r['error'][:80]}"
    return row


def columns(labels: tuple[str, str] = ("ours", "TRL")) -> list[str]:
    """The columns of `compare_row`'s rows (on the CPU with the ratio of rates per CPU second)."""
    a, b = labels
    return ["row", "unit", a, b, f"{a}/{b}", f"{a} peak", f"{b} peak"] + ([] if GPU else [f"{a}/{b} by CPU s"])


SUMMARY = columns()
PACKING = ("packed", "padded")  # our rm/dpo with data.packing true vs false (bench/suite.py's packing table)


def write_outputs(rows: list[dict], columns: list[str], json_path: Path | None, title: str = "") -> str:
    text = (title + "\n" if title else "") + table(rows, columns)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    return text


if __name__ == "__main__":  # a child: common.py MODULE FUNCTION SPEC.json OUT.json
    _child_main(*sys.argv[1:5])
