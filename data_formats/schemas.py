"""Record formats and their validation.

- Alpaca:      {"instruction", "input"?, "output"}  (or an HH pair: its chosen response) -> SFTRecord
- Preference:  {"prompt" | "instruction"+"input"?, "chosen", "rejected", "margin"?}  -> PreferenceRecord
               or Anthropic HH-RLHF transcripts {"chosen", "rejected"}  (see `hh_split`)
- Prompt-only: {"prompt"}, Alpaca without "output", or an HH pair     -> PromptRecord

A `prompt` field is used verbatim; `instruction` (+ `input`) is rendered through the template.
Extra keys are ignored (prompt records keep them in `meta`, e.g. the task suite's `answer`/`task`).
Every problem is a DataError naming `file:line` and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_formats.readers import Raw
from data_formats.templates import Template
from rlhf.errors import DataError

HH_SPLIT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass
class SFTRecord:
    where: str
    prompt: str
    response: str


@dataclass
class PreferenceRecord:
    where: str
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass
class PromptRecord:
    where: str
    prompt: str
    meta: dict = field(default_factory=dict)


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


def prompt_of(raw: Raw, template: Template) -> str:
    """`prompt` verbatim, or `instruction` (+ `input`) rendered through the template."""
    if "prompt" in raw.data and raw.data["prompt"] is not None:
        return _text(raw, "prompt")
    if "instruction" not in raw.data:
        raise DataError("missing (give 'prompt', or 'instruction' and optional 'input')", raw.where, "instruction")
    instruction = _text(raw, "instruction")
    inp = _text(raw, "input", required=False, empty_ok=True) or ""
    return template.render(instruction, inp)


def parse_alpaca(raw: Raw, template: Template) -> SFTRecord:
    """Alpaca record; an HH-RLHF pair also works (SFT on its chosen response, the usual HH recipe)."""
    if is_hh(raw):
        pair = hh_split(raw)
        if not pair.chosen.strip():  # nothing after the last Assistant turn: only EOS would be trained
            raise DataError("response is empty", raw.where, "chosen")
        return SFTRecord(raw.where, pair.prompt, pair.chosen)
    prompt = prompt_of(raw, template)
    return SFTRecord(raw.where, prompt, _text(raw, "output"))


def parse_prompt(raw: Raw, template: Template) -> PromptRecord:
    """Prompt-only record: `prompt`, Alpaca fields, or an HH-RLHF pair (the shared transcript)."""
    if is_hh(raw):
        return PromptRecord(raw.where, hh_split(raw).prompt, {})
    prompt = prompt_of(raw, template)
    meta = {k: v for k, v in raw.data.items() if k not in ("prompt", "output")}
    return PromptRecord(raw.where, prompt, meta)


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


def parse_preference(raw: Raw, template: Template, fmt: str = "auto") -> PreferenceRecord:
    if fmt == "hh" or (fmt == "auto" and is_hh(raw)):
        rec = hh_split(raw)
    else:
        rec = PreferenceRecord(raw.where, prompt_of(raw, template), _text(raw, "chosen"), _text(raw, "rejected"),
                               _margin(raw))
    if not rec.chosen.strip():
        raise DataError("response is empty", raw.where, "chosen")
    if not rec.rejected.strip():
        raise DataError("response is empty", raw.where, "rejected")
    if rec.chosen == rec.rejected:
        raise DataError("identical to chosen (the pair carries no preference)", raw.where, "rejected")
    return rec


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
