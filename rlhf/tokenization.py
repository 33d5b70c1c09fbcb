"""Tokenizers for the stages: loading (folder, run folder or hub id), the pad token, the stop tokens.

`load_tokenizer` gives every stage a tokenizer that pads with a token that is neither a stop token nor
used by its template (`choose_pad`), with the chat template the recipe asks for; `stop_token_ids` lists
every id that ends a response (EOS, the generation config's list, the chat template's end of turn).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_formats.chat import end_of_turn, install_chat_template, install_template, note
from rlhf.errors import UserError
from rlhf.models import hub_error, looks_like_path, model_dir


DEFAULT_PAD = "<|pad|>"


def load_tokenizer(spec: str, key: str = "model.name_or_path", pad_token: str | None = None,
                   revision: str | None = None, trust_remote_code: bool = False,
                   pad_key: str | None = None, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer of a model reference with a dedicated pad token (never silently pad = eos).

    `chat_template` (a shipped name such as 'chatml', or a .jinja file) is installed first, adding the
    special tokens it declares when the tokenizer lacks them. Then the pad token: `pad_token` when given
    and the tokenizer has none or pads with EOS; otherwise an existing special token that is neither a stop
    token nor written by the chat template (see `choose_pad`), so that no embedding row has to be added;
    otherwise, with no pad at all, '<|pad|>' is added. Pad equal to EOS with no spare special token is an
    error unless the recipe names a pad token to add: masking by pad id would also hide EOS, and the reward
    head would read the wrong token. Added tokens require `resize_embeddings` on the model (the loaders do
    it). `pad_key` is the recipe key errors name (default: `pad_token` of `key`'s section).
    """
    where, _ = model_dir(spec, key)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(spec, err, key) from None
    if tok.eos_token is None:
        raise UserError(f"tokenizer of {spec} has no EOS token; responses could never end", None, key)
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    if chat_template:
        install_template(tok, chat_template, section + "chat_template")
    pad_key = pad_key or section + "pad_token"
    if pad_token is not None and (tok.pad_token is None or tok.pad_token_id == tok.eos_token_id):
        tok.add_special_tokens({"pad_token": pad_token})
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        spare = choose_pad(tok, stop_token_ids(tok, where))
        had = "had none" if tok.pad_token is None else f"padded with its EOS token {tok.eos_token!r}"
        if spare is not None:
            tok.pad_token = spare
            note(f"pad token: {spare!r} (id {tok.pad_token_id}), an existing special token that is neither a stop "
                 f"token nor written by the chat template (the tokenizer {had})")
        elif tok.pad_token is None:
            tok.add_special_tokens({"pad_token": DEFAULT_PAD})
            note(f"pad token: {DEFAULT_PAD!r} added (the tokenizer had none, and no spare special token)")
        else:
            fix = (f"set {pad_token_key_hint(pad_key)} to add a dedicated pad token" if pad_key.endswith("pad_token")
                   else "use a model whose tokenizer has a dedicated pad token (a run folder of this pipeline)")
            raise UserError(f"the tokenizer of {spec} pads with its EOS token {tok.eos_token!r} and has no spare "
                            f"special token to pad with; {fix}", None, pad_key)
    if tok.pad_token_id == tok.eos_token_id:
        raise UserError(f"pad token {tok.pad_token!r} is the EOS token", None, pad_key)
    return tok


def tokenizer_for(model_section, data_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a recipe's `model` section (its pad token, chat template, revision and remote-code
    setting). With the stage's `data.template`, its chat template is made to render the format the stage
    trains (`data_formats.chat.install_chat_template`), so the tokenizer saved with the model does too."""
    tokenizer = load_tokenizer(model_section.name_or_path, pad_token=model_section.pad_token,
                               revision=model_section.revision, trust_remote_code=model_section.trust_remote_code,
                               chat_template=model_section.chat_template)
    if data_template is not None:
        install_chat_template(tokenizer, data_template)
    return tokenizer


# the names a spare pad token is looked for by, in order: Llama 3's <|finetune_right_pad_id|>, then
# GPT-2/Qwen style <|endoftext|> (when a chat template's end of turn is the stop token), reserved tokens
PAD_NAMES = ("pad", "endoftext", "reserved")


def choose_pad(tokenizer, stops: list[int]) -> str | None:
    """An existing special token to pad with: not BOS, not a stop token, not written by the chat template
    (its text does not appear in the template), preferring the names in PAD_NAMES; None when there is none."""
    template = tokenizer.chat_template or ""
    spare = [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items())
             if t.special and i not in stops and i != tokenizer.bos_token_id and t.content not in template]
    for name in PAD_NAMES:
        named = [t for t in spare if name in t.lower()]
        if named:
            return named[0]
    return spare[0] if spare else None


def stop_token_ids(tokenizer, source=None) -> list[int]:
    """Every id that ends a response: EOS, each id of the model's `generation_config.eos_token_id` (Llama 3
    lists several), and the chat template's end-of-turn token ('<|im_end|>', '<|eot_id|>').

    `source`: a model folder or run folder (its generation_config.json is read when present), a hub id (its
    generation config, from the local hub cache when offline), a GenerationConfig or its dict, or None."""
    ids = [tokenizer.eos_token_id]
    gen = source
    if isinstance(source, (str, Path)):  # a model folder, or a run folder with the model in model/
        path = next((f for f in (Path(source) / "generation_config.json", Path(source) / "model" /
                                 "generation_config.json") if f.is_file()), None)
        gen = json.loads(path.read_text()) if path else _hub_generation_config(str(source))
    listed = gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None)
    ids += listed if isinstance(listed, list) else [listed] if listed is not None else []
    end = end_of_turn(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    return list(dict.fromkeys(i for i in ids if i is not None))


def _hub_generation_config(spec: str) -> dict | None:
    """The generation config of a hub id (None for a local path, or when the hub and its cache have none)."""
    if Path(spec).expanduser().exists() or looks_like_path(spec):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(spec).to_dict()
    except (OSError, ValueError):
        return None


def pad_token_key_hint(key: str) -> str:
    return f"{key}='{DEFAULT_PAD}'"
