"""Shared pieces of the benchmarks: random-init Llama models, synthetic data, timing, memory, tables.

Both sides of every comparison get the same model folder, the same records and the same batch and
LoRA settings. Throughput is measured over equal work: one pass over the same records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 4, 4, 176, 512),
    "270m": (1024, 16, 16, 8, 2816, 32000),
    "1b": (2048, 16, 32, 8, 5632, 32000),
}
H100_BF16_FLOPS = 989e12


def build_model(size: str, folder: Path, seq_cls: bool = False) -> Path:
    """A random-init Llama (and a byte-level BPE trained on synthetic text) saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_text(20000 if size != "tiny" else 2000), trainer)
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


WORDS = ("the model data train reward policy value token answer question list sort reverse number letter "
         "write explain short long first last simple which when where because example result").split()


def synthetic_text(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


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


def pair_records(n: int, seed: int = 0) -> list[dict]:
    rows = alpaca_records(n, seed=seed)
    rng = random.Random(seed + 1)
    return [{"instruction": r["instruction"], "chosen": r["output"],
             "rejected": " ".join(rng.sample(r["output"].split(), len(r["output"].split())))} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB RSS (process max)"


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def mfu(params: int, tokens_per_s: float, peak: float) -> str:
    """Model FLOPs utilization with the 6·N·tokens convention (2N forward + 4N backward)."""
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    return f"{100 * 6 * params * tokens_per_s / peak:.1f}%"


def step_timer():
    """A fresh TrainerCallback that adds up the seconds spent inside TRL's training steps
    (`.seconds`) and notes when the first step began (`.first`, for work done before it)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds, start, first = 0.0, 0.0, None
        times: list = []

        def on_step_begin(self, *a, **k):
            self.start = sync()
            self.first = self.first or self.start

        def on_step_end(self, *a, **k):
            self.times.append(sync() - self.start)
            self.seconds += self.times[-1]

    timer = StepTimer()
    timer.times = []
    return timer


def keep_known(cls, **kwargs):
    """Build a (TRL) config dataclass from the kwargs its version knows (fields differ across releases)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def run_ours(stage: str, recipe: dict, folder: Path) -> dict:
    """Run one of our stages from a recipe dict; returns seconds in training steps and the manifest."""
    import yaml

    from rlhf.recipes import load_recipe

    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, **recipe}, sort_keys=False))
    stages = __import__(f"stages.{stage}", fromlist=["run"])
    reset_memory()
    out = stages.run(load_recipe(path, stage))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_time = sum(x.get("perf/step_time_s", 0.0) for x in lines)
    return {"seconds": step_time, "lines": lines, "manifest": json.loads((out / "manifest.json").read_text()),
            "memory": peak_memory()}


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
