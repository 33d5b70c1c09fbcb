"""Saving trained models as plain Hugging Face folders, and checking what was written.

Every model folder a stage writes goes through `save_model`: an HF folder (full model or peft adapter)
with the tokenizer and a generation config with pad != eos and every stop id, then `verify_model_dir`
reloads it (tensors present, non-empty, finite; config and tokenizer load). `fingerprint` records the
in-memory model's outputs on a fixed probe so that a reload can be compared with the model as it was at the
end of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from rlhf.files import write_json_atomic
from rlhf.runtime import collective_forwards
from rlhf.models import STATS_FILE, ScalarHead, hf_model, model_dir
from rlhf.tokenization import stop_token_ids

def save_model(accelerator, model: nn.Module, tokenizer, path: Path, base: str | None = None) -> dict:
    """Write `path` as an HF folder: a peft adapter (its `base_model_name_or_path` = `base`) or a full
    model, plus the tokenizer and a generation config with pad != eos. Returns the manifest's
    `model_info`. Call on every process (FSDP/ZeRO-3 gather the weights collectively)."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    state = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)  # gathered full weights (collective)
    offset, root = None, unwrapped
    if isinstance(unwrapped, ScalarHead):
        if unwrapped.bias is not None and accelerator.is_main_process:  # the gathered copy under FSDP/DeepSpeed
            offset = float((state["bias"] if state is not None else unwrapped.bias).detach().reshape(()))
        unwrapped = unwrapped.model
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} if state is not None \
            else None
    is_adapter = hasattr(unwrapped, "peft_config")
    hf = hf_model(unwrapped)
    task = "seq_cls" if hasattr(hf, "score") and not hasattr(hf, "lm_head") else "causal_lm"
    info = {"kind": "adapter" if is_adapter else "full", "task": task}
    # under FSDP and ZeRO-3 a forward gathers the shards from every process: all of them run the probe
    # (through the module that was prepared: under FSDP its root gathers the weights outside the wrapped layers)
    probe = fingerprint(root, tokenizer, offset=offset or 0.0) \
        if accelerator.is_main_process or collective_forwards(accelerator) else None
    if accelerator.is_main_process:
        info["fingerprint"] = probe
        path.mkdir(parents=True, exist_ok=True)
        if is_adapter:
            info["base"] = str(Path(base).resolve()) if base and Path(base).exists() else base
            base_dir, _ = model_dir(base, "model.name_or_path") if base else (None, None)
            # a stage that added a pad token grew the embeddings: the adapter then carries them, so plain
            # `resize_token_embeddings(len(tokenizer))` + `PeftModel.from_pretrained` reproduces the model
            base_vocab = _vocab_size(base_dir)
            resized = base_vocab is not None and hf.get_input_embeddings().weight.shape[0] != base_vocab
            unwrapped.save_pretrained(str(path), state_dict=state, save_embedding_layers=resized)
            cfg_path = path / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            # plain peft loads the adapter onto this folder (a full model unless the parent is an adapter too)
            cfg["base_model_name_or_path"] = str(Path(base_dir).resolve()) if base_dir and Path(base_dir).exists() \
                else base_dir
            cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            # training turns the KV cache off; a saved model generates with it
            use_cache, hf.config.use_cache = hf.config.use_cache, True
            try:
                unwrapped.save_pretrained(str(path), state_dict=state, safe_serialization=True)
            finally:
                hf.config.use_cache = use_cache
        tokenizer.save_pretrained(str(path))
        if offset:  # plain transformers computes the head without it: value = output - mean, as a reward model's
            write_json_atomic(path / STATS_FILE, {"mean": -offset, "std": 1.0, "fitted_on": "critic output offset"})
        gen = getattr(hf, "generation_config", None)
        if task == "causal_lm" and gen is not None:
            set_generation_ids(gen, tokenizer, stop_token_ids(tokenizer, gen))
            gen.save_pretrained(str(path))
        verify_model_dir(path, info)
    accelerator.wait_for_everyone()
    return info


def set_generation_ids(gen, tokenizer, stop_ids: list[int]) -> None:
    """The special ids of a generation config that is saved with a model: pad (never EOS), BOS, and every stop
    id as `eos_token_id` (a list when there are several, e.g. EOS and the chat template's end of turn, so that
    plain `generate` stops where our engines do; one id stays an int)."""
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = list(stop_ids) if len(stop_ids) > 1 else stop_ids[0]
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def _vocab_size(base_dir: str | None) -> int | None:
    """Embedding rows of the full model an adapter is saved against (None: an adapter parent, or unknown)."""
    if base_dir is None or not (Path(base_dir) / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(base_dir)
    return getattr(config.get_text_config(), "vocab_size", None)


def fingerprint(model: nn.Module, tokenizer, width: int = 8, offset: float = 0.0) -> dict:
    """Outputs of the in-memory model on a fixed probe, stored in the manifest: reloading the saved
    files must reproduce them (tests and `verify` compare). Causal LMs: the first `width` logits at
    the last position; scalar models: the value at every position (a `ScalarHead` less its `offset`, the bias
    plain transformers does not add)."""
    ids = [t for t in range(3, 3 + 12) if t < len(tokenizer)]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    x = torch.tensor([ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hf = hf_model(model)
        if isinstance(model, ScalarHead):
            values = (model(x, torch.ones_like(x))[0] - offset).tolist()
        elif hasattr(hf, "score") and not hasattr(hf, "lm_head"):
            values = ScalarHead(model)(x, torch.ones_like(x))[0].tolist()
        else:
            values = model(input_ids=x).logits[0, -1, :width].float().tolist()
    model.train(was_training)
    return {"input_ids": ids, "values": values}


def verify_model_dir(path: Path, info: dict) -> None:
    """Reload what was written: tensors present, non-empty and finite; config and tokenizer load."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{path}: no safetensors weights were written")
    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.numel() == 0 or (t.is_floating_point() and not torch.isfinite(t).all()):
                    raise RuntimeError(f"{file}: tensor {name} is empty or not finite")
                count += 1
    if count == 0:
        raise RuntimeError(f"{path}: the weights file holds no tensors")
    AutoTokenizer.from_pretrained(str(path))
    if info["kind"] == "full":
        AutoConfig.from_pretrained(str(path))
