"""Loading models from a recipe: trained weights stay float32 under a bfloat16 model, LoRA or not."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rlhf.models import ScalarHead, hf_model, load_trainable, score_head
from rlhf.sections import LoraSection, ModelSection


def tiny(folder, cls, **extra):
    """A tiny random Llama saved in bfloat16 with a word-level tokenizer (pad 0, eos 1)."""
    from tokenizers import Tokenizer, models

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, **extra)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 32)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 7)


def one_small_step(model, head: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    before = head.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn().backward()
    optimizer.step()
    return before, head.weight.detach()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_scalar_head_trains_in_float32_under_bfloat16_weights(tmp_path, lora):
    tok = tiny(tmp_path, LlamaForSequenceClassification, num_labels=1)
    section = ModelSection(name_or_path=str(tmp_path), dtype="bfloat16")
    model = ScalarHead(load_trainable(section, LoraSection(r=4, alpha=8.0) if lora else None, tok, task="seq_cls"))
    head = score_head(model.model)
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    assert hf_model(model.model).model.embed_tokens.weight.dtype == torch.bfloat16  # the rest keeps model.dtype
    ids = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    before, after = one_small_step(model, head, lambda: model(ids, torch.ones_like(ids))[:, -1].sum())
    moved = (after - before).abs()
    # Adam's first step moves every weight by ~lr = 1e-5, less than half a bfloat16 step of weights >= 0.004: bf16
    # storage would have rounded the update away (the head would not train); float32 keeps it
    big = before.abs() >= 0.004
    assert torch.equal(before, before.to(torch.bfloat16).float())  # loaded from bf16: exactly representable
    assert big.sum() > 10 and (moved[big] > 0).all() and (moved[big] < bf16_ulp(before[big]) / 2).all()
    assert torch.equal(before[big].to(torch.bfloat16), after[big].to(torch.bfloat16))  # what bf16 would have kept


def test_lora_modules_to_save_stay_float32_and_the_model_still_runs_in_bfloat16(tmp_path):
    tok = tiny(tmp_path, LlamaForCausalLM)
    section = ModelSection(name_or_path=str(tmp_path), dtype="bfloat16")
    model = load_trainable(section, LoraSection(r=4, alpha=8.0, modules_to_save=["lm_head", "embed_tokens"]), tok)
    saved = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert {n.split(".")[-4] for n, _ in saved} == {"lm_head", "embed_tokens"}
    assert all(p.dtype == torch.float32 for _, p in saved)
    ids = torch.tensor([[2, 3, 4, 5]])
    logits = model(input_ids=ids).logits  # the float32 embedding output went back to bf16 for the layers
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    head = hf_model(model).lm_head.modules_to_save["default"]
    before, after = one_small_step(model, head, lambda: -model(input_ids=ids).logits[0, -1].log_softmax(-1)[7])
    assert not torch.equal(before, after)


def chatml_tokenizer(folder, cls, **extra):
    """`tiny`'s model and tokenizer with the shipped ChatML installed: <|im_start|> and <|im_end|> are ids 32, 33,
    beyond the model's 32 embedding rows."""
    from data_formats.chat import install_template

    tok = tiny(folder, cls, **extra)
    install_template(tok, "chatml")
    assert len(tok) == 34
    return tok


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_the_rows_of_the_tokens_a_chat_template_added_and_nothing_else_of_the_embeddings(tmp_path,
                                                                                                     tied):
    tok = chatml_tokenizer(tmp_path, LlamaForCausalLM, tie_word_embeddings=tied)
    section = ModelSection(name_or_path=str(tmp_path), dtype="bfloat16")
    model = load_trainable(section, LoraSection(r=4, alpha=8.0), tok)  # trainable_tokens: auto
    inner = hf_model(model)
    ids = torch.tensor([[32, 2, 3, 33, 32, 4, 5]])

    def rows():  # every token's input embedding, and its output logit for a fixed hidden state
        with torch.no_grad():
            embed = inner.model.embed_tokens(torch.arange(34)[None])[0].float()
            out = inner.lm_head(torch.ones(1, 32, dtype=next(inner.lm_head.parameters()).dtype))[0].float()
        return embed, out

    embed0, out0 = rows()
    assert torch.equal(embed0[32], embed0[33])  # new rows start alike (the mean of the others)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embed1, out1 = rows()
    moved = (embed1 - embed0).abs().amax(-1)
    assert (moved[32:] > 1e-3).all() and (moved[:32] == 0).all()  # only the new tokens' input rows
    assert not torch.equal(embed1[32], embed1[33])  # the model can now tell <|im_start|> from <|im_end|>
    moved_out = (out1 - out0).abs()
    assert (moved_out[32:] > 0).all() and (moved_out[:32] == 0).all()  # it can write <|im_end|>; nothing else moved
    # the adapter merges into plain weights that give the same logits (what every later stage and export load)
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits.float()
    assert torch.allclose(before, after, atol=2e-2), (before - after).abs().max()


def test_a_trained_copy_of_tied_embeddings_stays_tied_to_the_output_layer(tmp_path):
    tok = chatml_tokenizer(tmp_path, LlamaForCausalLM, tie_word_embeddings=True)
    section = ModelSection(name_or_path=str(tmp_path))
    model = load_trainable(section, LoraSection(r=4, alpha=8.0, modules_to_save=["embed_tokens"],
                                                trainable_tokens=[]), tok)
    inner = hf_model(model)
    embed, head = inner.model.embed_tokens, inner.lm_head
    trained = embed.modules_to_save["default"].weight
    assert trained.requires_grad
    assert head.modules_to_save["default"].weight is trained  # without the tie, lm_head kept the frozen rows


def test_trainable_tokens_must_be_in_the_vocabulary(tmp_path):
    from rlhf.errors import UserError

    tok = chatml_tokenizer(tmp_path, LlamaForCausalLM)
    section = ModelSection(name_or_path=str(tmp_path))
    with pytest.raises(UserError, match="lora.trainable_tokens") as err:
        load_trainable(section, LoraSection(r=4, alpha=8.0, trainable_tokens=["<|eot_id|>"]), tok)
    assert "'<|eot_id|>'" in str(err.value)
    model = load_trainable(section, LoraSection(r=4, alpha=8.0, trainable_tokens=["<|im_end|>"]), tok)
    assert any("trainable_tokens" in n for n, p in model.named_parameters() if p.requires_grad)
