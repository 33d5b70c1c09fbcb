"""`pretrain` stage: a byte-level BPE tokenizer and a small Llama causal LM trained from scratch.

This is how the offline demo gets a base model; users with a real base model skip it. The result is
a plain Hugging Face folder that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load with no
project code.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from data_formats.chat import install_template, installed_tokens, load_chat_template
from rlhf import loop
from rlhf.artifacts import RunFolder
from rlhf.corpus import prepare_corpus
from rlhf.data import read_corpus
from rlhf.errors import UserError
from rlhf.forward import label_logprobs
from rlhf.losses import masked_sum
from rlhf.models import count_parameters
from rlhf.tokenization import DEFAULT_PAD, load_tokenizer
from rlhf.saving import save_model
from rlhf.optim import build_optimizer, build_scheduler
from rlhf.recipes import PretrainRecipe, derived
from rlhf.runtime import engine_figures, engine_line, make_accelerator, seed_everything

BOS, EOS = "<s>", "</s>"


def train_tokenizer(docs: list[str], section, max_len: int):
    """Byte-level BPE (GPT-2 style pre-tokenization) with <|pad|>, <s> (added in front) and </s>, and, with
    `tokenizer.chat_template`, the special tokens that template declares (ChatML's <|im_start|> <|im_end|>): each is
    one token wherever the corpus writes it, and the template is installed.

    `tokenizer.existing` goes through the project's loader: a missing path is one line, and the pad
    token is guaranteed and never EOS (masking by pad id would hide EOS)."""
    if section.existing:
        return load_tokenizer(section.existing, "tokenizer.existing", pad_token=section.pad_token,
                              chat_template=section.chat_template)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    template = load_chat_template(section.chat_template, "tokenizer.chat_template") if section.chat_template else ""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=section.vocab_size, min_frequency=section.min_frequency,
                                  special_tokens=[DEFAULT_PAD, BOS, EOS, *installed_tokens(template)],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=DEFAULT_PAD,
                                        model_max_length=max_len)
    if section.chat_template:
        install_template(tokenizer, section.chat_template, "tokenizer.chat_template")
    return tokenizer


def run(recipe: PretrainRecipe) -> Path:
    accelerator = make_accelerator(recipe)
    folder = RunFolder(recipe, accelerator.is_main_process, accelerator.wait_for_everyone)
    if folder.finished:
        return folder.final
    seed_everything(recipe.seed)

    # --- data and tokenizer --------------------------------------------------------------------
    docs = read_corpus(recipe.data.train)
    for path in recipe.data.train:
        folder.input(f"corpus:{path}", path)
    random.Random(recipe.seed).shuffle(docs)
    n_eval = int(len(docs) * recipe.data.eval_fraction)
    eval_docs, train_docs = docs[:n_eval], docs[n_eval:]
    tokenizer = train_tokenizer(train_docs, recipe.tokenizer, recipe.data.max_len)
    # tokenized and packed once (<s> doc </s> <s> doc </s> ... cut into rows), memory-mapped from the cache
    train_rows, eval_rows, counts = prepare_corpus(recipe.data, tokenizer, train_docs, eval_docs, recipe.seed)
    if not len(train_rows):
        raise UserError(f"the corpus is shorter than one row of data.max_len={recipe.data.max_len} tokens",
                        None, "data.max_len")
    folder.counts = {"documents": len(docs), "eval_documents": n_eval, "train_rows": len(train_rows),
                     "eval_rows": len(eval_rows), "vocab_size": len(tokenizer),
                     "doc_tokens": counts["doc_tokens"]}

    # --- model ---------------------------------------------------------------------------------
    arch = recipe.model
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads, max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta, tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        print(f"pretrain: {total / 1e6:.2f}M parameters, {len(tokenizer)} tokens, {len(train_rows)} rows of "
              f"{recipe.data.max_len}; {engine_line(accelerator)}")

    steps = loop.total_steps(len(train_rows), recipe.train)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    # --- loss: next-token cross-entropy, mean over all predicted tokens of the step ------------------
    def batch_of(rows, idx: list[int]) -> torch.Tensor:
        return torch.tensor(rows[idx]["input_ids"], device=device)

    def make_loss(rows):
        def micro_loss(idx, den):
            ids = batch_of(rows, idx)  # (B, T)
            logprobs, mask, _ = label_logprobs(model, ids, ids)
            nll = -masked_sum(logprobs, mask)
            return nll / den["tokens"], {"loss": nll.detach() / den["tokens"]}
        return micro_loss

    tokens_per_row = recipe.data.max_len - 1
    task = loop.Task(
        n_train=len(train_rows), weights=lambda idx: {"tokens": float(len(idx) * tokens_per_row)},
        micro_loss=make_loss(train_rows), n_eval=len(eval_rows),
        eval_weights=lambda idx: {"tokens": float(len(idx) * tokens_per_row)}, eval_loss=make_loss(eval_rows),
        finalize=lambda s: {**s, "perplexity": math.exp(min(s["loss"], 50.0))} if "loss" in s else s)
    metrics = loop.run(accelerator, folder, recipe.train, recipe.seed, model, optimizer, scheduler, task, "pretrain")

    # --- artifact ----------------------------------------------------------------------------------
    info = save_model(accelerator, model, tokenizer, folder.partial / "model")
    return folder.finish(metrics, extra={"model_info": info, "parameters": total, "trainable_parameters": trainable},
                         derived=derived(recipe) | engine_figures(accelerator))
