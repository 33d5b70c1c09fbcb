"""Loading checkpoints (one function for every stage), scalar heads (tokenizers: `rlhf.tokenization`;
LoRA: `rlhf.lora`).

A model reference is one of:
  - a run folder of an earlier stage (has manifest.json): its `model/` holds a full model or a peft
    adapter; an adapter is applied to its parent (recursively) and merged, so the result is the
    model that stage trained;
  - a local Hugging Face folder;
  - a hub id (`org/name`, optional revision), inspected like a folder: its config.json (or
    adapter_config.json) is read through huggingface_hub, from the local hub cache when offline, so a
    `*ForSequenceClassification` checkpoint loads as a reward model with its head.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PretrainedConfig)

from rlhf.artifacts import read_manifest
from rlhf.errors import UserError
from rlhf.lora import apply_lora, trained_token_ids
from rlhf.zero3 import gathered, replicated_load, rows

# mean/std of a scalar model's outputs, kept next to its weights: normalized = (output - mean) / std
STATS_FILE = "reward_stats.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# ---------------------------------------------------------------------------------------------
# references


def looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)


def model_dir(spec: str, key: str) -> tuple[str, dict | None]:
    """Where the weights of `spec` are: (folder or hub id, manifest of the run folder or None)."""
    path = Path(spec).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        if not (path / "model").is_dir():
            raise UserError(f"run folder {spec} has no model/ (stage '{manifest.get('stage')}')", None, key)
        return str(path / "model"), manifest
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise UserError(f"{spec} is neither a run folder nor a Hugging Face model folder", None, key)
        return str(path), None
    if looks_like_path(spec) or path.suffix in (".yaml", ".json", ".safetensors"):
        raise UserError(f"model path {spec} not found", None, key)
    return spec, None  # a hub id


def model_file(where: str, name: str, revision: str | None = None) -> Path | None:
    """The file `name` of a model folder or hub id (downloaded, or found in the local hub cache when offline);
    None when it has none or the hub cannot be reached."""
    if Path(where).is_dir():
        path = Path(where, name)
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(where, name, revision=revision))
    except (OSError, ValueError, EntryNotFoundError):  # not in the repo or the cache, no network, a bad id
        return None


def hub_error(spec: str, err: Exception, key: str) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load '{spec}': {first}", None, key)


# ---------------------------------------------------------------------------------------------
# tokenizer


def resize_embeddings(model: nn.Module, vocab: int) -> None:
    """Grow the embeddings to `vocab` rows; new rows = mean of the old ones (deterministic, so a
    reloaded adapter sees exactly the same base)."""
    emb = model.get_input_embeddings()
    old = rows(emb.weight)
    if vocab <= old:
        return
    with contextlib.redirect_stderr(io.StringIO()):
        model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            w = layer.weight
            if rows(w) == vocab:
                with gathered(w):
                    w[old:] = w[:old].mean(0, keepdim=True)


# ---------------------------------------------------------------------------------------------
# models


def _from_pretrained(cls, where: str, spec: str, key: str, dtype, revision=None, trust_remote_code=False,
                     attn_implementation=None, quantization_config=None, **kw):
    kwargs = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=None, **kw)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise hub_error(spec, err, key) from None


def model_info(spec: str, key: str, revision: str | None = None) -> dict:
    """{'kind': 'full'|'adapter', 'task': 'causal_lm'|'seq_cls', 'base': parent spec} of a reference: a run
    folder's manifest says; a model folder or hub id is read from its adapter_config.json / config.json."""
    where, manifest = model_dir(spec, key)
    if manifest is not None:
        return manifest.get("model_info", {"kind": "full", "task": "causal_lm"})
    adapter = model_file(where, "adapter_config.json", revision)
    if adapter is not None:
        cfg = json.loads(adapter.read_text())
        task = "seq_cls" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
        return {"kind": "adapter", "task": task, "base": cfg.get("base_model_name_or_path")}
    config = model_file(where, "config.json", revision)
    if config is not None:
        archs = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return {"kind": "full", "task": "seq_cls"}
    return {"kind": "full", "task": "causal_lm"}


def load_model(spec: str, key: str = "model.name_or_path", *, task: str = "causal_lm", dtype: str = "float32",
               revision: str | None = None, trust_remote_code: bool = False, attn_implementation: str | None = None,
               vocab: int | None = None, quantize_4bit: bool = False) -> nn.Module:
    """Load any model reference as a plain transformers model (adapters merged, in `dtype`).

    task 'causal_lm' gives AutoModelForCausalLM; 'seq_cls' gives AutoModelForSequenceClassification with
    one label (a reward model as saved by the rm stage, or a causal LM given a new zero-initialized head).
    `vocab`: resize embeddings to the tokenizer's length.
    """
    where, manifest = model_dir(spec, key)
    info = model_info(spec, key, revision)
    # a converted or merged model is built from whole weights (ZeRO-3 partitions it at `prepare`)
    with replicated_load() if info.get("task", "causal_lm") != task or info["kind"] == "adapter" else \
            contextlib.nullcontext():
        return _load_model(where, info, spec, key, task, dtype, revision, trust_remote_code, attn_implementation,
                           vocab, quantize_4bit)


def _load_model(where, info, spec, key, task, dtype, revision, trust_remote_code, attn_implementation, vocab,
                quantize_4bit) -> nn.Module:
    torch_dtype = DTYPES[dtype]
    if info["kind"] == "adapter":
        if quantize_4bit:
            raise UserError(f"{spec} is a LoRA adapter; 4-bit (QLoRA) loading needs a full model: run "
                            f"`rlhf export` on it first and point to the export", None, key)
        from peft import PeftModel

        base = load_model(info["base"], key, task=info.get("task", "causal_lm"), dtype="float32",
                          trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        tok_vocab = len(AutoTokenizer.from_pretrained(where))
        resize_embeddings(base, tok_vocab)
        # merge in float32, then cast: merging in bf16 would round the LoRA update away
        model = PeftModel.from_pretrained(base, where).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base for inference; a loaded model is trainable as usual
        if torch_dtype not in ("auto", torch.float32):
            model = model.to(torch_dtype)
    else:
        qcfg = _qlora_config(key) if quantize_4bit else None
        saved_task = info.get("task", "causal_lm")
        cls = AutoModelForSequenceClassification if saved_task == "seq_cls" else AutoModelForCausalLM
        extra = {"num_labels": 1} if saved_task == "seq_cls" else {}
        model = _from_pretrained(cls, where, spec, key, torch_dtype, revision, trust_remote_code,
                                 attn_implementation, qcfg, **extra)
    if info.get("task", "causal_lm") != task:
        if task == "causal_lm":
            raise UserError(f"{spec} is a reward/value model, not a language model", None, key)
        model = causal_to_scalar(model)
    if vocab is not None:
        resize_embeddings(model, vocab)
    return model


def _qlora_config(key: str):
    if not torch.cuda.is_available():
        raise UserError("4-bit QLoRA needs a CUDA GPU (bitsandbytes); use quantization: none on CPU", None,
                        "lora.quantization")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("4-bit QLoRA needs bitsandbytes: pip install 'rlhf[qlora]'", None,
                        "lora.quantization") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def causal_to_scalar(causal: nn.Module) -> nn.Module:
    """A sequence-classification model (one label) sharing the causal LM's backbone weights.

    The new head starts at zero, so every score and value is 0 before training (a neutral start for
    a critic; the reward model learns it).
    """
    config = AutoConfig.for_model(**causal.config.to_dict())
    config.num_labels = 1
    config.architectures = None
    prefix = causal.base_model_prefix
    seq = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
    getattr(seq, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    with torch.no_grad():
        head = seq.score
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return seq


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/peft wrappers (LoRA layers stay injected)."""
    while hasattr(model, "module") and not hasattr(model, "base_model_prefix"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class ScalarHead(nn.Module):
    """Backbone + linear head: one float32 number per token (reward model and critic).

    Wraps a (peft-wrapped or plain) sequence-classification model so that DDP sees one forward. `bias=True`
    adds a trainable float32 offset to every output: a critic needs one (most sequence-classification heads
    have no bias), e.g. to start on the normalized reward scale (`rlhf.roles.fold_normalization`).
    """

    def __init__(self, model: nn.Module, bias: bool = False):
        super().__init__()
        self.model = model
        # shape (1,), not a scalar: FSDP2 shards parameters along a dimension
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32)) if bias else None

    def forward(self, input_ids, attention_mask, position_ids=None):  # (B, T) -> (B, T)
        hf = hf_model(self.model)
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, T, H)
        out = hf.score(hidden).squeeze(-1).float()
        return out + self.bias if self.bias is not None else out


def score_head(model: nn.Module) -> nn.Module:
    """The linear head of a sequence-classification model (the trained copy inside peft's modules_to_save)."""
    head = hf_model(model).score
    return head.modules_to_save[head.active_adapter] if hasattr(head, "modules_to_save") else head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# trained and frozen models


def load_trainable(model_section, lora_section, tokenizer, task: str = "causal_lm", spec: str | None = None,
                   key: str = "model.name_or_path") -> nn.Module:
    """The model a stage trains, from its recipe's `model` and `lora` sections: `spec` (default
    `model.name_or_path`) loaded in `model.dtype` (frozen base in 4 bits under QLoRA) with its embeddings
    grown to the tokenizer, gradient checkpointing if asked, the KV cache off for training, and a fresh LoRA
    adapter (a null `lora` section: full fine-tuning). `task='seq_cls'`: a scalar-head model whose head is
    always trained, with the pad id in its config (plain transformers pools the last non-pad token)."""
    model = load_model(spec or model_section.name_or_path, key, task=task,
                       quantize_4bit=bool(lora_section and lora_section.quantization == "4bit"),
                       **_load_options(model_section))
    base_rows = rows(model.get_input_embeddings().weight)
    resize_embeddings(model, len(tokenizer))
    token_ids = trained_token_ids(tokenizer, base_rows, lora_section) if lora_section is not None else []
    if task == "seq_cls":
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if lora_section is not None:
        model = apply_lora(model, lora_section, task, token_ids)
    keep_float32(model, "all" if lora_section is not None else "heads")
    return model


def keep_float32(model: nn.Module, which: str = "all") -> None:
    """Trained weights stay float32 whatever `model.dtype` is: an AdamW step of 1e-5 on a bfloat16 weight of
    ~0.004 rounds away. `which='all'`: every trainable module that is not LoRA's (scalar heads,
    `lora.modules_to_save`; peft keeps LoRA weights in float32 itself); 'heads': the scalar head only (full
    fine-tuning trains everything in `model.dtype`, by choice). A module made float32 computes in float32 (its
    inputs are cast); its output goes back to its old dtype for the layers after it, except a head's (`score`,
    `lm_head`), whose float32 output is the result."""
    for name, module in model.named_modules():
        head = any(part in ("score", "lm_head") for part in name.split("."))
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own or "lora_" in name or (which == "heads" and not head) or \
                all(p.dtype == torch.float32 for p in own):
            continue
        dtype = own[0].dtype
        module.float()
        module.register_forward_pre_hook(_cast_inputs)
        if not head:
            module.register_forward_hook(lambda _module, _inputs, out, dtype=dtype: out.to(dtype))


def _cast_inputs(module: nn.Module, inputs: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)


def load_frozen(model_section, tokenizer, device, spec: str | None = None, key: str = "model.name_or_path",
                task: str = "causal_lm") -> nn.Module:
    """A frozen copy (a reference model) loaded with the same `model` settings, in eval mode on `device`."""
    with replicated_load():
        model = load_model(spec or model_section.name_or_path, key, task=task, vocab=len(tokenizer),
                           **_load_options(model_section))
    return model.to(device).eval().requires_grad_(False)



def _load_options(model_section) -> dict:
    return dict(dtype=model_section.dtype, revision=model_section.revision,
                trust_remote_code=model_section.trust_remote_code,
                attn_implementation=model_section.attn_implementation)


@contextlib.contextmanager
def reference_model(policy: nn.Module, frozen: nn.Module | None = None):
    """The reference of PPO's KL and of DPO, without gradients: `frozen` when there is one (full
    fine-tuning, or a reference given explicitly), else the (unwrapped) LoRA `policy` with its adapter
    disabled — the starting model, with no second copy in memory. Eval mode either way (no dropout)."""
    with torch.no_grad():
        if frozen is not None:
            yield frozen
            return
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                yield policy
        finally:
            policy.train(was_training)


def disable_dropout(*models) -> None:
    """Dropout off in every role: logprobs of the rollout and of the update must be comparable.

    `nn.Dropout` modules get p = 0. Attention dropout is applied functionally in train mode from a float
    the attention module copied from its config (Llama: `self.attention_dropout`), so every float attribute
    named *dropout* of every module, and of every config found on the way (peft's inner model included),
    is set to 0 as well.
    """
    def zero(obj) -> None:
        for name, value in list(vars(obj).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(obj, name, 0.0)
            elif isinstance(value, PretrainedConfig):  # a module's config, a config's sub-configs
                zero(value)

    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            zero(module)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Under DeepSpeed ZeRO-3 a parameter holds only its partition (its
    local `numel` is 0 or a slice) and keeps its full size in `ds_numel`."""
    def size(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def module_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
