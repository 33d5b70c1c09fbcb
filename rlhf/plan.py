"""`rlhf plan RECIPE [--gpu-mem 80GiB] [--zero 0-3] [--gpus N] [--model ID]`: bytes per role before launching.

It works before anything has run: a model reference that is a run folder not written yet is followed through
the recipe next to RECIPE whose `output_dir` it is (the shipped recipe sets are linked that way) back to the
base model, whose config is read from its folder, the hub (or the local hub cache), or, offline, the small
copies shipped in `rlhf/model_configs/` for the hub models the shipped recipes name. `--model` plans every role
with the config of the model given instead.

The arithmetic (pure functions of numbers, all in bytes) follows what this code base actually does:
- weights: parameters x bytes(model.dtype); 4-bit QLoRA stores linear weights at 0.5 byte (+3 % for
  quantization constants). LoRA parameters are float32 (peft keeps adapters in fp32).
- gradients: trainable parameters x bytes of their dtype (LoRA: 4; full fine-tuning: model.dtype).
- optimizer (AdamW): two moments per trainable parameter, in the parameter's dtype (torch's AdamW keeps
  states like the parameters; there is no separate fp32 master copy).
- activations of one micro-batch, per layer and token, stored in the autocast dtype (bf16 under
  mixed precision, else model.dtype): 8h + 2·kv·d + 4i elements for a Llama block with memory-efficient
  attention (SDPA keeps no s x s scores) and no dropout — two norm inputs/outputs, q/k/v, attention
  output and o_proj input, and gate/up/act/product of the SwiGLU MLP — adapted from Korthikanti et al.
  2022 ("Reducing Activation Recomputation"), whose 34·s·b·h per GPT layer assumes a 4h GELU MLP.
  With gradient checkpointing: the layer inputs (h per token per layer) plus one layer recomputed.
  Plus float32 logits and their gradient over the sequence: 2 · B · T · V · 4.
- PPO rollout KV cache: 2 · L · kv · d · (prompt + new tokens) · generate.batch_size · bytes(dtype).
- ZeRO / FSDP over `gpus`: stage 1 shards optimizer states, 2 also gradients, 3 also weights.
- a fixed 1 GiB for the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from rlhf.errors import UserError
from rlhf.registry import PREFERENCE_LOSSES

GiB = 2 ** 30
OVERHEAD = 1 * GiB
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_DIR = Path(__file__).parent / "model_configs"  # ORG--NAME.json: hub configs for planning offline


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; units B, KB/MB/GB/TB (10^3), KiB/MiB/GiB/TiB (2^10)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"cannot read {text!r} as a size (e.g. 80GiB, 24GB)", None, "--gpu-mem")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def model_shape(config) -> dict:
    """Shape and exact parameter count of a Llama-like decoder from its transformers config."""
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    i, vocab = config.intermediate_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # Qwen2 has q/k/v biases and no `attention_bias` setting
    bias = bool(getattr(config, "attention_bias", config.model_type == "qwen2"))
    linear = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(a * b for a, b in linear.values()) + 2 * h  # + two RMSNorm weights
    if bias:
        per_layer += heads * d + 2 * kv * d + h * bool(getattr(config, "o_proj_bias", False))
    n = vocab * h + layers * per_layer + h + (0 if tied else vocab * h)
    return {"n_params": n, "hidden": h, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": d,
            "intermediate": i, "vocab": vocab, "linear": linear, "linear_params": layers * sum(
                a * b for a, b in linear.values())}


def lora_params(shape: dict, r: int, target_modules) -> int:
    """r · (in + out) for every adapted Linear ('all-linear' = the seven projections of every layer)."""
    names = LINEARS if target_modules == "all-linear" else [t for t in target_modules]
    per_layer = sum(r * (a + b) for name, (a, b) in shape["linear"].items() if any(name.endswith(t) for t in names))
    return shape["layers"] * per_layer


def activation_bytes(shape: dict, rows: int, seq: int, act_bytes: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass of one micro-batch (see module docstring)."""
    h, layers = shape["hidden"], shape["layers"]
    per_token_layer = 8 * h + 2 * shape["kv_heads"] * shape["head_dim"] + 4 * shape["intermediate"]
    tokens = rows * seq
    if checkpointing:
        body = tokens * (layers * h + per_token_layer) * act_bytes
    else:
        body = tokens * layers * per_token_layer * act_bytes
    return body + 2 * tokens * shape["vocab"] * 4


def role_bytes(shape: dict, dtype_bytes: int, *, trainable: bool, lora=None, quant4: bool = False, rows: int = 0,
               seq: int = 0, act_bytes: int = 2, checkpointing: bool = False, zero: int = 0, gpus: int = 1,
               kv_cache: int = 0, shared: bool = False) -> dict:
    """Bytes of one role on one device. `shared` = weights already counted (reference = actor, adapter off)."""
    n = shape["n_params"]
    if quant4:
        weights = int(shape["linear_params"] * 0.5 * 1.03) + (n - shape["linear_params"]) * 2
    else:
        weights = n * dtype_bytes
    if shared:
        weights = 0
    grads = optim = acts = 0
    if trainable:
        if lora is not None:
            extra = lora_params(shape, lora.r, lora.target_modules)
            weights += extra * 4
            grads, optim = extra * 4, extra * 8
        else:
            grads, optim = n * dtype_bytes, 2 * n * dtype_bytes
        acts = activation_bytes(shape, rows, seq, act_bytes, checkpointing)
    if zero >= 1:
        optim //= gpus
    if zero >= 2:
        grads //= gpus
    if zero >= 3:
        weights //= gpus
    total = weights + grads + optim + acts + kv_cache
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "kv_cache": kv_cache,
            "total": total}


def plan(recipe, shapes: dict, gpu_mem: int | None = None, zero: int = 0, gpus: int = 1) -> dict:
    """Per-role bytes for a stage recipe. `shapes`: {'policy': shape, 'reward': shape (ppo)}."""
    model_section = recipe.model
    stage, lora = recipe.stage, getattr(recipe, "lora", None)
    dtype_bytes = BYTES.get(getattr(model_section, "dtype", "float32"), 4)
    mixed = getattr(recipe.train, "mixed_precision", "no") in ("bf16", "fp16", "auto")
    act_bytes = 2 if mixed else dtype_bytes
    quant4 = bool(lora and lora.quantization == "4bit")
    ckpt = bool(getattr(model_section, "gradient_checkpointing", False))
    micro = recipe.train.micro_batch_size
    common = dict(act_bytes=act_bytes, checkpointing=ckpt, zero=zero, gpus=gpus)
    policy = shapes["policy"]
    roles = {}
    if stage in ("pretrain", "sft"):
        roles["policy"] = role_bytes(policy, dtype_bytes, trainable=True, lora=lora, quant4=quant4, rows=micro,
                                     seq=recipe.data.max_len, **common)
    elif stage == "rm":
        roles["reward"] = role_bytes(policy, dtype_bytes, trainable=True, lora=lora, quant4=quant4, rows=2 * micro,
                                     seq=recipe.data.max_len, **common)
    elif stage == "dpo":
        roles["policy"] = role_bytes(policy, dtype_bytes, trainable=True, lora=lora, quant4=quant4, rows=2 * micro,
                                     seq=recipe.data.max_len, **common)
        resident = not recipe.dpo.precompute_ref
        if not PREFERENCE_LOSSES[recipe.dpo.loss_type].reference_free:  # simpo / orpo hold no reference
            roles["reference"] = role_bytes(policy, dtype_bytes, trainable=False,
                                            shared=lora is not None or not resident)
    elif stage == "ppo":
        seq = recipe.data.max_prompt_len + recipe.generate.max_new_tokens
        kv = 2 * policy["layers"] * policy["kv_heads"] * policy["head_dim"] * seq * recipe.generate.batch_size * \
            dtype_bytes
        roles["actor"] = role_bytes(policy, dtype_bytes, trainable=True, lora=lora, quant4=quant4, rows=micro, seq=seq,
                                    kv_cache=kv, **common)
        roles["reference"] = role_bytes(policy, dtype_bytes, trainable=False, shared=lora is not None)
        if recipe.ppo.needs_critic():  # the roles the run holds: no critic for grpo/rloo/...
            critic_shape = shapes["reward"] if recipe.ppo.critic_init == "reward" else policy
            roles["critic"] = role_bytes(critic_shape, dtype_bytes, trainable=True, lora=lora, rows=micro, seq=seq,
                                         **common)
        if "reward" in shapes:  # no reward model when rewards come from ppo.reward_fn alone
            roles["reward"] = role_bytes(shapes["reward"], dtype_bytes, trainable=False)
    else:
        raise UserError(f"no memory plan for stage '{stage}' (it trains nothing)", None, "stage")
    total = sum(r["total"] for r in roles.values()) + OVERHEAD
    return {"stage": stage, "roles": roles, "overhead": OVERHEAD, "per_device": total, "gpu_mem": gpu_mem,
            "fits": None if gpu_mem is None else total <= gpu_mem, "zero": zero, "gpus": gpus}


def format_plan(result: dict) -> str:
    cols = ("weights", "gradients", "optimizer", "activations", "kv_cache", "total")
    gib = lambda b: f"{b / GiB:10.3f}"  # noqa: E731
    lines = [f"memory plan for {result['stage']} (GiB per device, ZeRO stage {result['zero']} over "
             f"{result['gpus']} GPU(s)):", f"{'role':<10}" + "".join(f"{c:>12}" for c in cols)]
    for name, r in result["roles"].items():
        lines.append(f"{name:<10}" + "".join(f"{gib(r[c]):>12}" for c in cols))
    lines.append(f"{'overhead':<10}{'':>60}{gib(result['overhead']):>12}")
    line = f"per device: {result['per_device'] / GiB:.2f} GiB"
    if result["gpu_mem"] is not None:
        free = (result["gpu_mem"] - result["per_device"]) / GiB
        line += f" of {result['gpu_mem'] / GiB:.2f} GiB — " + (f"fits ({free:.2f} GiB free)" if result["fits"]
                                                               else f"does not fit (short by {-free:.2f} GiB)")
    return "\n".join(lines + [line])


def load_config(spec: str, key: str, recipes: Path | None = None) -> tuple[object, list[str]]:
    """(transformers config, how it was found) of a model reference: adapters in run folders are followed to their
    base; a run folder that does not exist yet, through the recipe in `recipes` (a folder) whose output_dir it is;
    a hub id is read from the hub or its local cache, else from the copy in CONFIG_DIR."""
    from transformers import AutoConfig

    from rlhf.models import model_dir

    writer = None if Path(spec).expanduser().exists() else recipe_writing(spec, recipes)
    if writer is not None:
        config, trail = parent_config(writer, key)
        return config, [f"{spec}: written by {writer}"] + trail
    where, manifest = model_dir(spec, key)  # a missing path: the usual one-line error
    info = (manifest or {}).get("model_info", {})
    if info.get("kind") == "adapter" or (Path(where, "adapter_config.json").is_file() and
                                         not Path(where, "config.json").is_file()):
        base = info.get("base") or json.loads(Path(where, "adapter_config.json").read_text())["base_model_name_or_path"]
        return load_config(base, key, recipes)
    try:
        return AutoConfig.from_pretrained(where), [f"{spec}: its config.json"]
    except (OSError, ValueError) as err:
        shipped = None if Path(where).is_dir() else shipped_config(spec)
        if shipped is None:
            raise UserError(f"cannot read the config of {spec}: {str(err).splitlines()[0]} (pass --model with a "
                            f"folder or hub id to plan with)", None, key) from None
        return shipped, [f"{spec}: the shipped copy of its config (rlhf/model_configs/; not in the hub cache)"]


def shipped_config(hub_id: str):
    """The config of a hub model the shipped recipes name, from CONFIG_DIR (None for others)."""
    from transformers import AutoConfig

    path = CONFIG_DIR / (hub_id.replace("/", "--") + ".json")
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def recipe_writing(spec: str, recipes: Path | None) -> Path | None:
    """The recipe in the folder `recipes` whose output_dir is `spec` (a run folder it will write), if any."""
    import yaml

    target = os.path.normpath(spec)
    for path in sorted(recipes.glob("*.yaml")) if recipes else []:
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(raw, dict) and os.path.normpath(str(raw.get("output_dir", ""))) == target:
            return path
    return None


def parent_config(path: Path, key: str) -> tuple[object, list[str]]:
    """The config of the model a recipe's run will hold: its starting model's (sft, rm, dpo, ppo: model.name_or_path;
    export: source), or the architecture a pretrain recipe describes."""
    from rlhf.recipes import load_recipe

    recipe = load_recipe(path)
    if recipe.stage == "pretrain":
        return pretrain_config(recipe), [f"{path}: the architecture it pretrains"]
    if recipe.stage in ("sft", "rm", "dpo", "ppo", "export"):
        parent = recipe.source if recipe.stage == "export" else recipe.model.name_or_path
        return load_config(parent, key, path.parent)
    raise UserError(f"{path} is a '{recipe.stage}' recipe: its run folder holds no model", None, key)


def pretrain_config(recipe):
    """The Llama config a pretrain recipe builds."""
    from transformers import LlamaConfig

    arch = recipe.model
    return LlamaConfig(vocab_size=recipe.tokenizer.vocab_size, hidden_size=arch.hidden_size,
                       intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                       num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads or arch.num_heads,
                       tie_word_embeddings=arch.tie_word_embeddings)


def main(argv: list[str]) -> int:
    from rlhf.recipes import load_recipe

    parser = argparse.ArgumentParser(prog="rlhf plan", description="memory per role and device for a recipe")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--gpu-mem", default=None, help="memory of one GPU, e.g. 80GiB")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO / FSDP sharding stage")
    parser.add_argument("--gpus", type=int, default=1, help="processes the states are sharded over")
    parser.add_argument("--model", default=None, help="plan every role with this model's config (a folder or hub "
                                                      "id) instead of following the recipe's models")
    args = parser.parse_args(argv)
    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem else None
    recipe = load_recipe(args.recipe, None, args.overrides)
    here = Path(args.recipe).parent  # the recipe set the run folders it names are written by
    roles = {"policy": "model.name_or_path", "reward": "ppo.reward_model"}
    specs = {}
    if recipe.stage in ("sft", "rm", "dpo", "ppo"):
        specs["policy"] = recipe.model.name_or_path
        if recipe.stage == "ppo" and recipe.ppo.reward_model:
            specs["reward"] = recipe.ppo.reward_model
    elif recipe.stage != "pretrain":
        raise UserError(f"no memory plan for stage '{recipe.stage}' (it trains nothing)", args.recipe, "stage")
    shapes = {"policy": model_shape(pretrain_config(recipe))} if recipe.stage == "pretrain" else {}
    for role, spec in specs.items():
        config, trail = load_config(args.model or spec, "--model" if args.model else roles[role], here)
        shapes[role] = model_shape(config)
        print(f"{role} model: " + " <- ".join(trail))
    print(format_plan(plan(recipe, shapes, gpu_mem, args.zero, args.gpus)))
    return 0
