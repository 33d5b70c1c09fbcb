"""RL: our engine (`gae` with its critic, `grpo`, `rloo`) vs TRL's GRPOTrainer and RLOOTrainer at equal
settings, our PPO phases, and the rollout engine against `model.generate`.

    python bench/ppo.py --size 270m     # on the GPU: 16 prompts x k=4, prompt 128, 128 new tokens
    python bench/ppo.py --size small    # CPU, ~17M parameters (part of `bench/suite.py --cpu`)
    python bench/ppo.py --tiny          # CPU smoke run

Equal settings on both sides: the same policy and reward-model folders (full fine-tuning, a frozen
reference copy), the same prompts, k responses per prompt, new tokens, temperature 1 (no top-k/top-p),
beta, learning rate, one update epoch, and one optimizer step per rollout of `prompts x k` episodes in
micro-batches of `micro`. Episodes/s = episodes of every iteration but the first / their wall seconds
(end of one iteration to the end of the next: generate, score, reference and old log-probs, update,
logging). Our `grpo` puts the k3 KL in the loss as TRL's GRPO does, our `rloo` the k1 KL in the reward
as TRL's RLOO does. Each run is its own process; peak memory is that process's.

The rollout table runs in one process, interleaved and repeated: tokens/s of our seeded engine
(`rlhf.rollout.seeded_generate`: hashed Gumbel noise, host check every 8 tokens) vs transformers'
`generate` with a dynamic and a static KV cache, at the same batch, prompts and length (every row decodes
all `new` tokens), and on a GPU the memory-bandwidth bound (batch x HBM bytes/s / weight bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common import (DTYPE, GPU, SUMMARY, after_warmup, build_model, compare_row, in_child, keep_known, memory_unit,
                    profiler_of, prompt_records, reset_memory, run_ours, sync, table, trl_common, trl_timer,
                    write_jsonl)

PHASES = ("time/generate_s", "time/score_s", "time/ref_values_s", "time/update_s")
TRAINERS = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}


def ours(spec: dict) -> dict:
    est, episodes = spec["estimator"], spec["prompts"] * spec["k"]
    recipe = {"output_dir": spec["out"], "seed": 0, "model": {"name_or_path": spec["policy"], "dtype": DTYPE},
              "lora": None, "data": {"train": spec["data"], "template": "plain", "max_prompt_len": spec["prompt_len"]},
              "generate": {"max_new_tokens": spec["new"], "temperature": 1.0, "batch_size": episodes},
              "train": {"epochs": 100, "max_steps": spec["iterations"], "batch_size": episodes,
                        "micro_batch_size": spec["micro"], "lr": 1e-6, "save_every": 0, "scheduler": "constant",
                        "warmup_ratio": 0.0, "report_to": []},
              "ppo": {"reward_model": spec["reward"], "rollout_batch_size": spec["prompts"], "samples_per_prompt":
                      spec["k"], "ppo_epochs": 1, "kl_coef": spec["beta"], "advantage_estimator": est,
                      "critic_init": "reward", "normalize_reward": False,
                      "kl_in": "loss" if est == "grpo" else "reward", "kl_estimator": "k3" if est == "grpo" else "k1"}}
    result = run_ours("ppo", recipe, Path(spec["out"]), profiler_of(spec))
    lines = [x for x in result["lines"] if "time/generate_s" in x]
    out = after_warmup(result["stamps"], [episodes] * len(lines))
    steady = lines[1:]
    phases = {k: sum(x[k] for x in steady) / len(steady) for k in PHASES}
    phases["generate_tokens_per_s"] = sum(x["perf/generate_tokens_per_s"] for x in steady) / len(steady)
    phases["response_length"] = sum(x["response/length"] for x in steady) / len(steady)
    return {**out, "phases": phases}


def trl(spec: dict) -> dict:
    import trl as trl_lib
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    episodes = spec["prompts"] * spec["k"]
    name = TRAINERS[spec["estimator"]]
    config_cls, trainer_cls = getattr(trl_lib, name.replace("Trainer", "Config")), getattr(trl_lib, name)
    accumulation = episodes // spec["micro"]
    config = keep_known(config_cls, **trl_common(Path(spec["out"]), spec["micro"]),
                        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation,
                        num_generations=spec["k"], max_completion_length=spec["new"], temperature=1.0, top_k=0,
                        top_p=1.0, beta=spec["beta"], num_iterations=1, max_steps=spec["iterations"],
                        learning_rate=1e-6, lr_scheduler_type="constant", warmup_ratio=0.0, loss_type="dapo")
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.bfloat16 if GPU else torch.float32)
    # our `plain` template renders a prompt as its text and a newline
    data = Dataset.from_list([{"prompt": r["prompt"] + "\n"} for r in records])
    trainer = trainer_cls(model=model, reward_funcs=spec["reward"], args=config, train_dataset=data)
    timer = trl_timer(trainer, profiler=profiler_of(spec))
    reset_memory()
    trainer.train()
    return after_warmup(timer.stamps, [episodes] * len(timer.stamps))


def decode(spec: dict) -> dict:
    """Rollout tokens/s: our seeded engine vs `generate` (dynamic, static cache), interleaved, repeated."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.batching import collate_prompts
    from functools import partial

    from rlhf.rollout import hf_generate, row_keys, seeded_generate

    device = "cuda" if GPU else "cpu"
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.bfloat16 if GPU else torch.float32)
    model = model.to(device).eval()
    records = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()][:spec["batch"]]
    ids = [tok(r["prompt"] + "\n")["input_ids"][-spec["prompt_len"]:] for r in records]
    batch = collate_prompts([{"prompt_ids": p} for p in ids], tok.pad_token_id)
    input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    keys = row_keys(0, 0, range(len(ids)), device)
    engines = {"seeded": seeded_generate, "generate (dynamic cache)": hf_generate,
               "generate (static cache)": partial(hf_generate, static_cache=True)}
    vllm = vllm_decoder(model, len(ids), spec["new"], tok, device)
    if vllm is not None:
        engines["vllm"] = vllm
    rates: dict[str, list[float]] = {name: [] for name in engines}

    def once(name: str, new: int) -> float:
        cfg = SimpleNamespace(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0)
        began = sync()
        # a random-init model almost never ends every row early: each engine decodes `new` steps for all rows
        gen = engines[name](model, input_ids, mask, cfg, [tok.eos_token_id], tok.pad_token_id, keys=keys)
        seconds = sync() - began
        return gen.responses.numel() / seconds

    for name in engines:
        once(name, 4)  # warm-up
    names = list(engines)
    for rep in range(spec["repeats"]):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            rates[name].append(once(name, spec["new"]))
    out = {name: statistics.median(r) for name, r in rates.items()}
    out["seeded / dynamic per repeat"] = [s / d for s, d in zip(rates["seeded"], rates["generate (dynamic cache)"])]
    out["all"] = rates
    params = sum(p.numel() for p in model.parameters())
    out["bound"] = spec["batch"] * spec["hbm"] / (params * 2) if GPU else float("nan")
    return out


def vllm_decoder(model, batch: int, new: int, tok, device):
    """Our vLLM engine (`generate.engine: vllm`) as a decode function like the others, built once (its start is not
    timed); None where vLLM is not importable (the table then says so)."""
    import importlib.util
    from types import SimpleNamespace

    if importlib.util.find_spec("vllm") is None:
        return None
    from rlhf.context import RunContext
    from rlhf.vllm_engine import VLLMEngine

    cfg = SimpleNamespace(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, batch_size=batch, vllm_memory=0.3)
    ctx = RunContext(tok, (tok.eos_token_id,), tok.pad_token_id, None, 1.0, (tok.pad_token_id,), torch.device(device),
                     8)
    engine = VLLMEngine(model, ctx, cfg)
    return lambda model, input_ids, mask, cfg, stops, pad, keys=None: engine.generate(input_ids, mask, cfg, keys)


def prepare(size: str, out: Path, args) -> dict:
    policy = build_model(size, out / f"model-{size}")
    reward = build_model(size, out / f"reward-{size}", seq_cls=True)
    # prompt words ~ tokens with the bench tokenizers; BOS and the newline fill the rest
    data = write_jsonl(out / f"prompts-{size}.jsonl",
                       prompt_records(max(args.prompts * (args.iterations + 1), 64), args.prompt_len - 3))
    return {"policy": str(policy), "reward": str(reward), "data": str(data), "prompts": args.prompts, "k": args.k,
            "prompt_len": args.prompt_len, "new": args.new, "micro": args.micro, "beta": args.beta,
            "iterations": args.iterations, "profile": args.profile}


def rows_for(size: str, out: Path, args) -> tuple[list[dict], list[dict], list[dict]]:
    """(summary rows, phase rows, rollout rows) at one size."""
    spec = prepare(size, out, args)
    runs = {}
    for est in ("gae", "grpo", "rloo"):
        runs[f"ours {est}"] = in_child("ppo", "ours", {**spec, "estimator": est, "out": str(out / f"ppo-ours-{est}")})
    for est in TRAINERS:
        runs[f"TRL {est}"] = in_child("ppo", "trl", {**spec, "estimator": est, "out": str(out / f"ppo-trl-{est}")})
    k = args.k
    summary = [compare_row(f"GRPO k={k} vs GRPOTrainer ({size})", "episodes/s", runs["ours grpo"], runs["TRL grpo"], 2),
               compare_row(f"RLOO k={k} vs RLOOTrainer ({size})", "episodes/s", runs["ours rloo"], runs["TRL rloo"], 2),
               compare_row(f"PPO (gae, critic) k={k} vs RLOOTrainer ({size})", "episodes/s", runs["ours gae"],
                           runs["TRL rloo"], 2)]
    phases = []
    for est in ("gae", "grpo", "rloo"):
        p = runs[f"ours {est}"].get("phases")
        if p:
            phases.append({"estimator": est, **{k.split("/")[1][:-2]: f"{p[k]:.2f}" for k in PHASES},
                           "iteration s": f"{spec['prompts'] * k / runs[f'ours {est}']['rate']:.2f}",
                           "rollout tok/s": f"{p['generate_tokens_per_s']:,.0f}"})
    rollout = []
    if args.decode_repeats:
        d = in_child("ppo", "decode", {**spec, "batch": spec["prompts"] * k, "repeats": args.decode_repeats,
                                       "hbm": args.hbm, "out": str(out / "decode")})
        if "error" in d:
            rollout.append({"engine": "failed", "per repeat": d["error"]})
        else:
            dyn = d["generate (dynamic cache)"]
            for name in ("seeded", "generate (dynamic cache)", "generate (static cache)", "vllm"):
                if name not in d:  # vLLM where it is importable (make setup-vllm; pip install 'rlhf[vllm]')
                    rollout.append({"engine": name, "per repeat": "skipped: vLLM is not importable here"})
                    continue
                rollout.append({"engine": name, "tokens/s (median)": f"{d[name]:,.0f}",
                                "vs dynamic": f"{d[name] / dyn:.2f}x",
                                "per repeat": ", ".join(f"{x:,.0f}" for x in d["all"][name])})
            if GPU:
                rollout.append({"engine": "bandwidth bound", "tokens/s (median)": f"{d['bound']:,.0f}",
                                "vs dynamic": f"{d['bound'] / dyn:.2f}x"})
    return summary, phases, rollout


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many steps after the first, "
                   "both sides; tables in <out>/*.profile.txt")
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    p.add_argument("--k", type=int, default=4, help="responses per prompt")
    p.add_argument("--micro", type=int, default=16, help="episodes per micro-batch")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=128)
    p.add_argument("--new", type=int, default=128, help="new tokens per response")
    p.add_argument("--iterations", type=int, default=5, help="iterations (the first is a warm-up)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both sides)")
    p.add_argument("--decode-repeats", dest="decode_repeats", type=int, default=5)
    p.add_argument("--hbm", type=float, default=3.35e12, help="memory bandwidth, bytes/s (H100 SXM)")


def small(args) -> None:
    args.prompts, args.k, args.micro, args.prompt_len, args.new, args.iterations = 8, 4, 8, 64, 64, 4


def print_tables(summary, phases, rollout, args, json_path: Path | None) -> str:
    text = [f"peak memory: {memory_unit()}", table(summary, SUMMARY), "",
            f"our phases, seconds per iteration ({args.prompts} prompts x k={args.k}, {args.new} new tokens):",
            table(phases, ["estimator", "generate", "score", "ref_values", "update", "iteration s", "rollout tok/s"]),
            "", f"rollout engines, batch {args.prompts * args.k}, {args.new} new tokens:",
            table(rollout, ["engine", "tokens/s (median)", "vs dynamic", "per repeat"])]
    if json_path:
        json_path.write_text(json.dumps({"summary": summary, "phases": phases, "rollout": rollout}, indent=2))
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="270m")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    add_args(p)
    args = p.parse_args()
    if args.tiny:
        args.size = "tiny"
        small(args)
        args.iterations, args.new, args.decode_repeats = 3, 16, 2
    elif args.size == "small":
        small(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    print(print_tables(*rows_for(args.size, out, args), args, args.json))


if __name__ == "__main__":
    main()
