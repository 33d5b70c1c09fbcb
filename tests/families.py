"""Hand-made tokenizers for tests (no hub): a Llama-3-style one (its pre-tokenizer regex and template), a
ChatML one (Qwen2.5-Instruct-like) and a base one with no template."""

from __future__ import annotations

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
CORPUS = ["Reverse the list.\n\nc a f b\n\nb f a c", "Hello there, how are you today? I am fine.\n\nThanks!",
          "Sort the list in alphabetical order.\na b c d e f g h", "Be brief. Say hi."] * 20


def bpe(specials: list[str], llama3: bool = False, bos: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 byte_level]) if llama3 else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def llama3() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return PreTrainedTokenizerFast(tokenizer_object=bpe(specials, llama3=True, bos="<|begin_of_text|>"),
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   chat_template=LLAMA3_TEMPLATE)


def chatml() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def base() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe(["<s>", "</s>"], bos="<s>"), bos_token="<s>",
                                   eos_token="</s>")
