"""PPO: where the time goes, generation throughput against its bounds, and TRL's RLOO side by side.

    python bench/ppo.py                 # on the GPU: ~270M Llama, batch 64, prompt 128, 128 new tokens
    python bench/ppo.py --tiny          # CPU smoke run

Printed: our per-phase seconds (generate / score / ref+values / update) and episodes/s (critic
included), generated tokens/s of our rollout engine, plain `model.generate` tokens/s with a dynamic
and a static KV cache, the memory-bandwidth bound of decoding (batch x HBM bytes/s / bytes of weights
read per step), and TRL RLOOTrainer episodes/s at the same lengths and beta.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import WORDS, build_model, keep_known, reset_memory, run_ours, step_timer, sync, table, write_jsonl


def prompts(n: int, words: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(words))} for _ in range(n)]


def plain_generate(model_dir: Path, rows: list[dict], args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    batch = tok([r["prompt"] for r in rows[:args.batch]], return_tensors="pt", padding=True, truncation=True,
                max_length=args.prompt_len).to(device)
    out = {}
    for cache in ("dynamic", "static"):
        kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True, pad_token_id=tok.pad_token_id)
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        with torch.no_grad():
            model.generate(**batch, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            start = sync()
            model.generate(**batch, **kwargs)
            out[cache] = args.batch * args.new / (sync() - start)
    params = sum(p.numel() for p in model.parameters())
    out["bound"] = args.batch * args.hbm / (params * (2 if torch.cuda.is_available() else 4))
    return out


def run_rloo(model_dir: Path, rm_dir: Path, rows: list[dict], args, out: Path) -> float:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    config = keep_known(RLOOConfig, output_dir=str(out), per_device_train_batch_size=args.batch, num_generations=2,
                        max_completion_length=args.new, max_prompt_length=args.prompt_len, beta=args.beta,
                        max_steps=args.iterations, learning_rate=1e-6, bf16=torch.cuda.is_available(),
                        logging_steps=10 ** 9, save_strategy="no", report_to="none",
                        use_cpu=not torch.cuda.is_available())
    trainer = RLOOTrainer(model=str(model_dir), reward_funcs=str(rm_dir), args=config,
                          train_dataset=Dataset.from_list(rows))

    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    steady = timer.times[1:] or timer.times
    return args.batch / (sum(steady) / len(steady))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="270m")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=64, help="rollout batch (episodes per iteration)")
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=128)
    p.add_argument("--new", type=int, default=128, help="new tokens per response")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both sides)")
    p.add_argument("--hbm", type=float, default=3.35e12, help="memory bandwidth, bytes/s (H100 SXM)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.size, args.batch, args.prompt_len, args.new, args.iterations = "tiny", 8, 32, 16, 3
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    model_dir = build_model(args.size, out / "policy")
    rm_dir = build_model(args.size, out / "reward", seq_cls=True)
    rows = prompts(max(4 * args.batch, 64), args.prompt_len)
    data = write_jsonl(out / "prompts.jsonl", rows)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    recipe = {"output_dir": str(out / "ours"), "seed": 0, "model": {"name_or_path": str(model_dir), "dtype": dtype},
              "lora": None, "data": {"train": str(data), "max_prompt_len": args.prompt_len},
              "generate": {"max_new_tokens": args.new, "temperature": 1.0, "batch_size": args.batch},
              "train": {"epochs": 100, "max_steps": args.iterations, "batch_size": args.batch // 2,
                        "micro_batch_size": args.batch // 4, "lr": 1e-6, "save_every": 0, "scheduler": "constant",
                        "warmup_ratio": 0.0},
              "ppo": {"reward_model": str(rm_dir), "rollout_batch_size": args.batch, "ppo_epochs": 1,
                      "kl_coef": args.beta, "critic_init": "reward", "normalize_reward": False}}
    reset_memory()
    ours = run_ours("ppo", recipe, out)
    steady = [x for x in ours["lines"] if "time/generate_s" in x][1:]  # first iteration warms up
    phases = {k: sum(x[k] for x in steady) / len(steady)
              for k in ("time/generate_s", "time/score_s", "time/ref_values_s", "time/update_s")}
    iteration = sum(phases.values())
    gen_tps = sum(x["perf/generate_tokens_per_s"] for x in steady) / len(steady)
    plain = plain_generate(model_dir, rows, args)
    try:
        rloo = f"{run_rloo(model_dir, rm_dir, rows, args, out / 'rloo'):.1f}"
    except Exception as err:
        rloo = f"failed: {type(err).__name__}: {str(err)[:100]}"
    rows_out = [{"what": f"ours: {k.split('/')[1][:-2]} s / iteration", "value": f"{v:.3f}"} for k, v in phases.items()]
    rows_out += [{"what": "ours: episodes/s (PPO with critic)", "value": f"{args.batch / iteration:.1f}"},
                 {"what": "TRL RLOOTrainer: episodes/s", "value": rloo},
                 {"what": "ours: rollout generated tokens/s (seeded engine)", "value": f"{gen_tps:,.0f}"},
                 {"what": "model.generate tokens/s, dynamic cache", "value": f"{plain['dynamic']:,.0f}"},
                 {"what": "model.generate tokens/s, static cache", "value": f"{plain['static']:,.0f}"},
                 {"what": "decode bound tokens/s (batch x HBM / weight bytes)", "value": f"{plain['bound']:,.0f}"},
                 {"what": "ours: rollout / bound", "value": f"{100 * gen_tps / plain['bound']:.2f}%"}]
    print(f"model {args.size}, batch {args.batch}, prompt {args.prompt_len}, {args.new} new tokens, beta {args.beta}")
    print(table(rows_out, ["what", "value"]))
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
