"""Record formats and their validation. Every parser reads a record into messages and renders them
through the format (`data_formats.chat`): a text template (`alpaca`, `plain`, ...) or `chat`.

- SFT:         Alpaca {"instruction", "input"?, "output"} (or {"prompt": str, "output"}); OpenAI
               {"messages": [{"role", "content"}, ...]} (multi-turn, optional system turn); ShareGPT
               {"conversations": [{"from", "value"}, ...]}; {"prompt": [msgs], "completion": [msgs]}
               (only the completion is trained); an HH pair (its chosen response)        -> SFTRecord
- Preference:  {"prompt" | "instruction"+"input"?, "chosen", "rejected", "margin"?} with strings, or
               {"chosen": [msgs], "rejected": [msgs]} whose turns before the last are the prompt
               (UltraFeedback-binarized), or {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]};
               Anthropic HH-RLHF transcripts {"chosen", "rejected"} (see `hh_split`)   -> PreferenceRecord
- Prompt-only: {"prompt": str | [msgs]}, {"messages": [...]} (a last assistant turn is dropped), Alpaca
               without "output", or an HH pair                                          -> PromptRecord

A `prompt` string is used verbatim by text templates (and is the user turn under `chat`); `instruction`
(+ `input`) is rendered through the template. HH transcripts are verbatim under text templates and
become messages under `chat`. Extra keys are ignored (prompt records keep them in `meta`, e.g. the task
suite's `answer`/`task`). Every problem is a DataError naming `file:line` and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_formats.chat import Segment, hh_messages, read_messages, user_message
from data_formats.readers import Raw
from rlhf.errors import DataError

HH_SPLIT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass
class SFTRecord:
    where: str
    prompt: str  # the text the first response follows: what the model is given when it generates it
    response: str  # the first (or only) response; under `chat` with its end-of-turn token
    rest: list[Segment] = field(default_factory=list)  # a multi-turn conversation after the first response
    eos: bool = True  # the EOS id follows every response (text templates; a chat template with no end of turn)
    special_tokens: bool = True  # tokenizing `prompt` adds BOS; False when the chat template wrote it


@dataclass
class PreferenceRecord:
    where: str
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    eos: bool = True
    special_tokens: bool = True


@dataclass
class PromptRecord:
    where: str
    prompt: str
    meta: dict = field(default_factory=dict)
    special_tokens: bool = True
    messages: list[dict] | None = None  # the turns `prompt` renders (None: an HH transcript used verbatim)
    record: dict = field(default_factory=dict)  # the record as read: another model's format re-renders it


def _text(raw: Raw, name: str, required: bool = True, empty_ok: bool = False) -> str | None:
    value = raw.data.get(name)
    if value is None:
        if required:
            raise DataError("missing", raw.where, name)
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", raw.where, name)
    if not empty_ok and not value.strip():
        raise DataError("is empty", raw.where, name)
    return value


def prompt_messages(raw: Raw) -> list[dict]:
    """The prompt of a record with string fields: `prompt` (verbatim for text templates) or `instruction`
    (+ `input`)."""
    if "prompt" in raw.data and raw.data["prompt"] is not None:
        return [user_message(_text(raw, "prompt"), verbatim=True)]
    if "instruction" not in raw.data:
        raise DataError("missing (give 'prompt', or 'instruction' and optional 'input')", raw.where, "instruction")
    instruction = _text(raw, "instruction")
    return [user_message(instruction, _text(raw, "input", required=False, empty_ok=True) or "")]


def conversation(raw: Raw) -> tuple[list[dict], int, str] | None:
    """(messages, index of the first trainable turn, field) of a conversational SFT record, else None."""
    d = raw.data
    if "messages" in d:
        return read_messages(d["messages"], raw.where, "messages"), 0, "messages"
    if "conversations" in d:
        return read_messages(d["conversations"], raw.where, "conversations", sharegpt=True), 0, "conversations"
    if isinstance(d.get("prompt"), list) or isinstance(d.get("completion"), list):
        prompt = read_messages(d.get("prompt"), raw.where, "prompt")
        return prompt + read_messages(d.get("completion"), raw.where, "completion"), len(prompt), "completion"
    return None


def _sft_record(where: str, segments: list[Segment], fmt) -> SFTRecord:
    return SFTRecord(where, segments[0].text, segments[1].text, segments[2:], fmt.eos, fmt.special_tokens)


def parse_alpaca(raw: Raw, fmt) -> SFTRecord:
    """An SFT record in any of the forms above (the name is historical: Alpaca was the first)."""
    conv = conversation(raw)
    if conv is not None:
        messages, first, name = conv
        if not any(m["role"] == "assistant" for m in messages[first:]):
            raise DataError("has no assistant turn: nothing to train", raw.where, name)
        return _sft_record(raw.where, fmt.segments(messages, raw.where, first), fmt)
    if is_hh(raw):  # SFT on the chosen response, the usual HH recipe
        pair = hh_split(raw)
        if not pair.chosen.strip():  # nothing after the last Assistant turn: only EOS would be trained
            raise DataError("response is empty", raw.where, "chosen")
        if not fmt.chat:
            return SFTRecord(raw.where, pair.prompt, pair.chosen)
        prompt = hh_messages(pair.prompt, raw.where, "chosen")  # its earlier Assistant turns are prompt
        messages = prompt + [{"role": "assistant", "content": pair.chosen.strip()}]
        return _sft_record(raw.where, fmt.segments(messages, raw.where, len(prompt)), fmt)
    messages = prompt_messages(raw) + [{"role": "assistant", "content": _text(raw, "output")}]
    return _sft_record(raw.where, fmt.segments(messages, raw.where), fmt)


def parse_prompt(raw: Raw, fmt) -> PromptRecord:
    """Prompt-only record, rendered with the generation prompt: `prompt`, `messages`, Alpaca fields, or an
    HH-RLHF pair (the shared transcript)."""
    d = raw.data
    meta = {k: v for k, v in d.items() if k not in ("prompt", "output", "messages", "conversations")}
    if is_hh(raw):
        transcript = hh_split(raw).prompt
        if not fmt.chat:
            return PromptRecord(raw.where, transcript, {}, fmt.special_tokens, record=d)
        messages, name = hh_messages(transcript, raw.where, "chosen"), "chosen"
    elif "conversations" in d:
        messages, name = read_messages(d["conversations"], raw.where, "conversations", sharegpt=True), "conversations"
    elif "messages" in d or isinstance(d.get("prompt"), list):
        name = "messages" if "messages" in d else "prompt"
        messages = read_messages(d[name], raw.where, name)
    else:
        messages, name = prompt_messages(raw), "prompt"
    if name != "prompt" and len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # an SFT conversation used as a prompt: the model writes the last reply
    if messages[-1]["role"] != "user":
        raise DataError(f"the last turn is the {messages[-1]['role']}'s; a prompt ends with a user turn", raw.where,
                        name)
    return PromptRecord(raw.where, fmt.prompt(messages, raw.where), meta, fmt.special_tokens, messages, d)


def is_hh(raw: Raw) -> bool:
    """An HH-RLHF transcript pair: no prompt field, and a chosen text with Human/Assistant turns (a Human
    turn alone counts, so that a transcript missing its Assistant turn is reported as such)."""
    d = raw.data
    return ("prompt" not in d and "instruction" not in d and isinstance(d.get("chosen"), str)
            and (HH_SPLIT in d["chosen"] or HH_HUMAN in d["chosen"]))


def hh_split(raw: Raw) -> PreferenceRecord:
    """Anthropic HH-RLHF: both transcripts share everything up to the last '\\n\\nAssistant:'."""
    chosen, rejected = _text(raw, "chosen"), _text(raw, "rejected")
    cut_c, cut_r = chosen.rfind(HH_SPLIT), rejected.rfind(HH_SPLIT)
    if cut_c < 0:
        raise DataError(f"has no {HH_SPLIT!r} turn", raw.where, "chosen")
    if cut_r < 0:
        raise DataError(f"has no {HH_SPLIT!r} turn", raw.where, "rejected")
    end_c, end_r = cut_c + len(HH_SPLIT), cut_r + len(HH_SPLIT)
    if chosen[:end_c] != rejected[:end_r]:
        raise DataError("chosen and rejected transcripts differ before the last Assistant turn", raw.where,
                        "rejected")
    return PreferenceRecord(raw.where, chosen[:end_c], chosen[end_c:], rejected[end_r:], _margin(raw))


def parse_preference(raw: Raw, fmt, kind: str = "auto") -> PreferenceRecord:
    """A preference pair in any of the forms above; `kind` 'hh' forces HH transcripts, 'auto' detects."""
    if kind == "hh" or (kind == "auto" and is_hh(raw)):
        pair = hh_split(raw)
        prompt = hh_messages(pair.prompt, raw.where, "chosen") if fmt.chat else None
        chosen, rejected = (pair.chosen.strip(), pair.rejected.strip()) if fmt.chat else (pair.chosen, pair.rejected)
    elif any(isinstance(raw.data.get(k), list) for k in ("prompt", "chosen", "rejected")):
        prompt, chosen, rejected = preference_turns(raw)
    else:
        prompt, chosen, rejected = prompt_messages(raw), _text(raw, "chosen"), _text(raw, "rejected")
    if not chosen.strip():
        raise DataError("response is empty", raw.where, "chosen")
    if not rejected.strip():
        raise DataError("response is empty", raw.where, "rejected")
    if chosen == rejected:
        raise DataError("identical to chosen (the pair carries no preference)", raw.where, "rejected")
    if prompt is None:  # an HH transcript under a text template: verbatim, as it was written
        return pair
    return PreferenceRecord(raw.where, fmt.prompt(prompt, raw.where), fmt.reply(prompt, chosen, raw.where),
                            fmt.reply(prompt, rejected, raw.where), _margin(raw), fmt.eos, fmt.special_tokens)


def preference_turns(raw: Raw) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a conversational pair: an explicit `prompt` list,
    or the turns chosen and rejected share before their last (assistant) turn."""
    d, where = raw.data, raw.where
    sides = {side: read_messages(d.get(side), where, side) if isinstance(d.get(side), list)
             else [{"role": "assistant", "content": _text(raw, side)}] for side in ("chosen", "rejected")}
    if isinstance(d.get("prompt"), list):
        prompt = read_messages(d["prompt"], where, "prompt")
        for side, turns in sides.items():  # a completion that repeats the prompt turns
            if len(turns) > len(prompt) and turns[:len(prompt)] == prompt:
                sides[side] = turns[len(prompt):]
        for side, turns in sides.items():
            if len(turns) != 1:
                raise DataError(f"expected the one assistant turn that answers the prompt, got {len(turns)} turns",
                                where, side)
    else:
        prompt = sides["chosen"][:-1]
        if prompt != sides["rejected"][:-1]:
            raise DataError("chosen and rejected differ before their last turn (the shared turns are the prompt)",
                            where, "rejected")
        if not prompt:
            if d.get("prompt") is None and "instruction" not in d:
                raise DataError("has no turn before the reply: give the prompt turns in chosen and rejected, or a "
                                "'prompt'", where, "chosen")
            prompt = prompt_messages(raw)
    for side, turns in sides.items():
        if turns[-1]["role"] != "assistant":
            index = f"[{len(d[side]) - 1}]" if isinstance(d.get(side), list) else ""
            raise DataError(f"the last turn is the {turns[-1]['role']}'s, not the assistant's", where,
                            f"{side}{index}.role")
    return prompt, sides["chosen"][-1]["content"], sides["rejected"][-1]["content"]


def _margin(raw: Raw) -> float | None:
    m = raw.data.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise DataError(f"expected a number, got {type(m).__name__}", raw.where, "margin")
    try:
        value = float(m)
    except OverflowError:  # an integer beyond the float range
        value = math.inf
    if not math.isfinite(value):  # JSON NaN/Infinity: every loss with it is NaN, so every step is skipped
        shown = repr(m) if len(repr(m)) <= 20 else f"{repr(m)[:12]}...({len(repr(m))} digits)"
        raise DataError(f"must be a finite number, got {shown}", raw.where, "margin")
    return value
