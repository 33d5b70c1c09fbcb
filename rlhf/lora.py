"""LoRA adapters: a fresh adapter on a loaded model (`apply_lora`), and which token rows it trains beside it
(`lora.trainable_tokens`: the tokens a run adds, such as the ChatML turn tokens installed into a base model)."""

from __future__ import annotations

from torch import nn

from data_formats.chat import note
from rlhf.errors import UserError


def apply_lora(model: nn.Module, lora, task: str = "causal_lm", token_ids: list[int] | None = None) -> nn.Module:
    """Wrap `model` with a fresh LoRA adapter; for scalar models the head is always trained. `token_ids`: tokens
    whose embedding rows are trained too (peft's trainable tokens; with untied output embeddings, their output
    rows as well; tied ones follow the input rows)."""
    from peft import LoraConfig, TaskType, get_peft_model

    embed = _module_name(model, model.get_input_embeddings())
    output = model.get_output_embeddings() if task != "seq_cls" else None
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    tokens = None
    if token_ids:  # a tied output layer follows the input rows (peft ties them); an untied one gets its own rows
        tokens = {embed: list(token_ids)}
        if output is not None and not tied:
            tokens[_module_name(model, output)] = list(token_ids)
    embeddings = {embed, _module_name(model, output)} if output is not None else {embed}
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, modules_to_save=list(lora.modules_to_save) or None,
        task_type=TaskType.SEQ_CLS if task == "seq_cls" else TaskType.CAUSAL_LM,
        trainable_token_indices=tokens,
        # a trained copy of tied embeddings stays tied (else the output layer keeps the frozen rows)
        ensure_weight_tying=tied and bool(embeddings & set(lora.modules_to_save)),
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        if "not found" not in str(err) and "target modules" not in str(err).lower():
            raise
        raise UserError(f"{lora.target_modules!r} matches no module of the model (its linear layers: "
                        f"{', '.join(linear)})", None, "lora.target_modules") from None
    if task == "seq_cls":
        for name, p in peft_model.named_parameters():
            if ".score." in name and "modules_to_save" in name:
                p.requires_grad_(True)
    return peft_model


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The last part of `module`'s name inside `model` ('embed_tokens', 'lm_head', 'wte', ...)."""
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def trainable_token_ids(tokenizer, rows: int, lora_section) -> list[int]:
    """The ids of `lora.trainable_tokens`: 'auto' = every token the tokenizer has beyond the model's `rows`
    embedding rows (added by this run: the ChatML turn tokens, a new pad); a list names tokens, each one that the
    tokenizer knows."""
    if lora_section.trainable_tokens == "auto":
        return list(range(rows, len(tokenizer)))
    vocab = tokenizer.get_vocab()
    missing = [t for t in lora_section.trainable_tokens if t not in vocab]
    if missing:
        raise UserError(f"{', '.join(map(repr, missing))} not in the tokenizer's vocabulary", None,
                        "lora.trainable_tokens")
    return [vocab[t] for t in lora_section.trainable_tokens]


def trained_token_ids(tokenizer, rows: int, lora_section) -> list[int]:
    """`trainable_token_ids`, with a note naming them, or, when there are none, a note on added tokens left
    untrained (`rows`: the model's embedding rows before it was grown to the tokenizer)."""
    token_ids = trainable_token_ids(tokenizer, rows, lora_section)
    if token_ids:
        note(f"LoRA also trains the embedding rows of {' '.join(tokenizer.convert_ids_to_tokens(token_ids))} "
             f"(lora.trainable_tokens)")
    else:
        _note_untrained_tokens(tokenizer, rows, lora_section)
    return token_ids


def _note_untrained_tokens(tokenizer, rows: int, lora_section) -> None:
    """Tokens the chat template writes that the model had no embedding for (ChatML installed into a base model)
    start as the mean of the others, all alike; LoRA does not train embeddings, so they would stay so."""
    new = [t.content for i, t in tokenizer.added_tokens_decoder.items()
           if i >= rows and t.content in (tokenizer.chat_template or "")]
    if new and not {"embed_tokens", "lm_head"} & set(lora_section.modules_to_save):
        note(f"note: {' '.join(new)} are new to this model and start with the same embedding, which LoRA does not "
             f"train: the model cannot tell them apart; train their rows (lora.trainable_tokens: auto) or fine-tune "
             f"in full (lora: null)")
