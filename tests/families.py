"""Tokenizers and tiny models of several architecture families, built here by hand (no hub), with the chat
templates and special tokens of the instruct models they stand for:

- llama3: Llama; the Llama 3 template (writes BOS, turns end <|eot_id|>); stops <|end_of_text|>, <|eot_id|>;
  no pad (a reserved special token is chosen).
- qwen2: Qwen2 with tied embeddings; ChatML; stops <|im_end|> (EOS) and <|endoftext|>, which is also the pad.
- mistral: Mistral; [INST] ... [/INST] and ' ' + reply + </s>; stop </s>; no pad (<unk> is chosen).
- gemma2: Gemma2 (tied, soft-capping, sliding window); <start_of_turn>, writes BOS; stops <eos>, <end_of_turn>;
  pad <pad>.
- phi3: Phi-3 (fused qkv and gate/up); <|user|> ... <|end|>, EOS after the last turn; stops <|endoftext|>, <|end|>;
  pads with EOS (<unk> is chosen).
- gpt2: GPT-2 (Conv1D layers, tied); no template: the shipped ChatML is installed; stops <|endoftext|>,
  <|im_end|>; no pad and nothing spare (<|pad|> is added).
- gpt_neox: GPT-NeoX (Pythia); the OpenAssistant template <|prompter|> ... <|endoftext|><|assistant|>, whose
  end of turn is EOS; pad <|padding|>.

`build(family, folder, corpus)` writes a model folder (random weights, config, tokenizer, generation config)
that `rlhf` loads as it would a hub checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{- bos_token -}}{%- for message in messages -%}{{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}{%- endfor -%}"
                   "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
                   "{%- endif -%}")
CHATML_TEMPLATE = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
                   "{%- endif -%}")
MISTRAL_TEMPLATE = ("{{- bos_token -}}{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
                    "{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- elif message['role'] == 'assistant' -%}"
                    "{{- ' ' + message['content'] + eos_token -}}{%- else -%}"
                    "{{- raise_exception('Only user and assistant roles are supported') -}}{%- endif -%}{%- endfor -%}")
GEMMA_TEMPLATE = ("{{- bos_token -}}{%- for message in messages -%}{%- set role = 'model' if message['role'] == "
                  "'assistant' else message['role'] -%}{{- '<start_of_turn>' + role + '\n' + message['content'] | trim "
                  "+ '<end_of_turn>\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' "
                  "-}}{%- endif -%}")
# Phi-3-mini's own: EOS after the last turn of a rendering that is not a generation prompt
PHI3_TEMPLATE = ("{%- for message in messages -%}{{- '<|' + message['role'] + '|>\n' + message['content'] + "
                 "'<|end|>\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}"
                 "{{- eos_token -}}{%- endif -%}")
OASST_TEMPLATE = ("{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{{- '<|assistant|>' + "
                  "message['content'] + eos_token -}}{%- else -%}{{- '<|' + ('prompter' if message['role'] == 'user' "
                  "else 'system') + '|>' + message['content'] + eos_token -}}{%- endif -%}{%- endfor -%}"
                  "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")
CORPUS = ["Reverse the list.\n\nc a f b\n\nb f a c", "Hello there, how are you today? I am fine.\n\nThanks!",
          "Sort the list in alphabetical order.\na b c d e f g h", "Be brief. Say hi."] * 20


def bpe(specials: list[str], llama3: bool = False, bos: str | None = None, corpus: list[str] | None = None,
        vocab: int = 400) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (every text encodes); `bos` is put before every text."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 byte_level]) if llama3 else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus or CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def llama3(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = bpe(specials, llama3=True, bos="<|begin_of_text|>", corpus=corpus)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)


def chatml(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], corpus=corpus),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def base(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<s>", "</s>"], bos="<s>", corpus=corpus), bos_token="<s>",
                                   eos_token="</s>")


def mistral(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<unk>", "<s>", "</s>"], bos="<s>", corpus=corpus),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=MISTRAL_TEMPLATE)


def gemma(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    return PreTrainedTokenizerFast(tokenizer_object=bpe(specials, bos="<bos>", corpus=corpus), pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   chat_template=GEMMA_TEMPLATE)


def phi3(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|system|>", "<|end|>",
                "<|user|>"]
    return PreTrainedTokenizerFast(tokenizer_object=bpe(specials, bos="<s>", corpus=corpus), unk_token="<unk>",
                                   bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=PHI3_TEMPLATE)


def gpt2(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<|endoftext|>"], corpus=corpus), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def gpt_neox(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|padding|>", "<|prompter|>", "<|assistant|>", "<|system|>"]
    return PreTrainedTokenizerFast(tokenizer_object=bpe(specials, corpus=corpus), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=OASST_TEMPLATE)


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: object  # corpus -> PreTrainedTokenizerFast
    config: str  # transformers config class name
    arch: dict  # tiny sizes and family settings
    stops: tuple[str, ...]  # what its generation_config.eos_token_id lists, as tokens
    chat_template: str | None = None  # model.chat_template to install (a base model with no template)
    expected_stops: tuple[str, ...] = ()  # every stop token the pipeline must find
    expected_pad: str = ""


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=256)
FAMILIES = {
    "llama3": Family("llama3", llama3, "LlamaConfig", dict(SMALL, num_key_value_heads=1, tie_word_embeddings=False),
                     ("<|end_of_text|>", "<|eot_id|>"), expected_stops=("<|end_of_text|>", "<|eot_id|>"),
                     expected_pad="<|finetune_right_pad_id|>"),
    "qwen2": Family("qwen2", chatml, "Qwen2Config", dict(SMALL, num_key_value_heads=1, tie_word_embeddings=True),
                    ("<|im_end|>", "<|endoftext|>"), expected_stops=("<|im_end|>", "<|endoftext|>"),
                    expected_pad="<|endoftext|>"),
    "mistral": Family("mistral", mistral, "MistralConfig", dict(SMALL, num_key_value_heads=1, sliding_window=None),
                      ("</s>",), expected_stops=("</s>",), expected_pad="<unk>"),
    "gemma2": Family("gemma2", gemma, "Gemma2Config",
                     dict(SMALL, num_key_value_heads=1, head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
                          tie_word_embeddings=True),
                     ("<eos>", "<end_of_turn>"), expected_stops=("<eos>", "<end_of_turn>"), expected_pad="<pad>"),
    "phi3": Family("phi3", phi3, "Phi3Config", dict(SMALL, num_key_value_heads=2, sliding_window=None),
                   ("<|endoftext|>", "<|end|>"), expected_stops=("<|endoftext|>", "<|end|>"), expected_pad="<unk>"),
    "gpt2": Family("gpt2", gpt2, "GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
                   ("<|endoftext|>",), chat_template="chatml", expected_stops=("<|endoftext|>", "<|im_end|>"),
                   expected_pad="<|pad|>"),
    "gpt_neox": Family("gpt_neox", gpt_neox, "GPTNeoXConfig",
                       dict(SMALL, rotary_pct=0.5, tie_word_embeddings=False), ("<|endoftext|>",),
                       expected_stops=("<|endoftext|>",), expected_pad="<|padding|>"),
}


def build(family: str, folder: Path, corpus: list[str] | None = None, seed: int = 0) -> Path:
    """A model folder of `family`: random weights (seeded), config, tokenizer, generation config."""
    import torch
    import transformers

    spec = FAMILIES[family]
    tok = spec.tokenizer(corpus)
    config = getattr(transformers, spec.config)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                **spec.arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in spec.stops]
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_hub_cache(home: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """`folder`'s files as the hub client lays out a downloaded snapshot under `$HF_HOME`:
    hub/models--ORG--NAME/{refs/main (the commit), snapshots/COMMIT/<files>}; returns the snapshot folder."""
    import shutil

    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
