"""Conversations and how they become text: the format a model is trained and prompted with.

Records are read into messages (`{"role": "system"|"user"|"assistant", "content": str}`); a format,
built from the recipe's `data.template` and the model's tokenizer by `make_format`, renders them:

- `TextFormat` (`alpaca`, `plain`, ...): one instruction (+ input) per prompt, exactly as the text
  template writes it; the tokenizer adds its special tokens (BOS); EOS ends the response.
- `ChatFormat` (`chat`): the tokenizer's own chat template (`apply_chat_template`). Every assistant
  turn is trained: its content and the end-of-turn token the template writes. The spans are read off
  the rendered text (see `ChatFormat.segments`), never guessed; the template writes the special tokens
  it wants (Llama 3 writes BOS), so rendered text is tokenized without adding them again.

`install_chat_template` makes a saved tokenizer's `chat_template` render the format it was trained with
(a text template becomes a Jinja template that writes exactly its prompt), and `load_chat_template`
reads a template for `model.chat_template` (the shipped `chatml`, or a .jinja file).
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError

from data_formats.templates import TEMPLATE_DIR, Template, load_template
from rlhf.errors import DataError, UserError, describe

CHAT = "chat"  # the `data.template` value that selects the tokenizer's chat template
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# first line of a .jinja template may declare the special tokens it writes: installing it adds the missing ones
TOKENS_DECLARATION = re.compile(r"^\{#-?\s*special tokens:([^#]*?)-?#\}")
# a chat template made from a text template begins by declaring it (JSON in a comment): a model exported with it
# (a reward model on the hub) can be read in that text template again, Alpaca's `input` field included
TEXT_TEMPLATE_DECLARATION = "{#- text template: "


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text: an assistant turn (trained) or the text around it (not trained)."""
    text: str
    trained: bool


# ---------------------------------------------------------------------------------------------
# messages from records


def read_messages(value, where: str, field: str, sharegpt: bool = False) -> list[dict]:
    """Validate a list of messages, OpenAI `{"role", "content"}` or ShareGPT `{"from": "system"|"human"|"gpt",
    "value"}`, into messages; problems name `field[i].role` / `field[i].content` (`.from` / `.value`)."""
    role_key, content_key, roles = ("from", "value", SHAREGPT_ROLES) if sharegpt else ("role", "content", OPENAI_ROLES)
    if value is None:
        raise DataError("missing", where, field)
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", where, field)
    if not value:
        raise DataError("is empty (no messages)", where, field)
    return [_message(m, where, f"{field}[{i}]", role_key, content_key, roles) for i, m in enumerate(value)]


def _message(m, where: str, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"expected an object with {role_key!r} and {content_key!r}, got {type(m).__name__}", where,
                        field)
    role, content = m.get(role_key), m.get(content_key)
    if role is None:
        raise DataError("missing", where, f"{field}.{role_key}")
    if not isinstance(role, str) or role not in roles:  # a list or object there is unhashable: say so, not a TypeError
        raise DataError(f"unknown role {str(role)[:40]!r} (expected {', '.join(sorted(roles))})", where,
                        f"{field}.{role_key}")
    if content is None:
        raise DataError("missing", where, f"{field}.{content_key}")
    if not isinstance(content, str):
        raise DataError(f"expected a string, got {type(content).__name__}", where, f"{field}.{content_key}")
    if roles[role] != "system" and not content.strip():
        raise DataError("is empty", where, f"{field}.{content_key}")
    return {"role": roles[role], "content": content}


def user_message(instruction: str, input: str | None = None, verbatim: bool = False) -> dict:
    """A user turn from Alpaca fields (chat templates see `instruction\\n\\ninput`) or a verbatim prompt
    string (text templates use it unchanged). The extra keys tell text templates how to render it."""
    content = f"{instruction}\n\n{input}" if input else instruction
    return {"role": "user", "content": content, "instruction": instruction, "input": input or "",
            "verbatim": verbatim}


def hh_messages(transcript: str, where: str, field: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages; the empty
    Assistant turn that ends a prompt transcript is dropped."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    if parts[0].strip():
        raise DataError("text before the first Human turn", where, field)
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or any(not m["content"] for m in messages):
        raise DataError("has an empty turn", where, field)
    return messages


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------------------------
# formats


class TextFormat:
    """A text template (`alpaca`, `plain`, ...): a single user turn rendered as its prompt, the response
    directly after it. The tokenizer adds its special tokens (BOS) and EOS ends the response."""

    chat = False
    special_tokens = True  # tokenizing a prompt adds BOS, as the base model saw at the start of documents
    eos = True  # the EOS id follows every response
    end = None  # no end-of-turn token of its own: EOS ends a response

    def __init__(self, template: Template, key: str = "data.template"):
        self.template, self.key = template, key

    @property
    def signature(self) -> tuple:
        """What the format writes: two formats with the same signature render any record alike."""
        return ("text", self.template.prompt_input, self.template.prompt_no_input)

    def prompt(self, messages: list[dict], where: str) -> str:
        self._single_turn(messages, where, with_reply=False)
        user = messages[0]
        if user.get("verbatim"):
            return user["content"]
        return self.template.render(user.get("instruction", user["content"]), user.get("input"))

    def reply(self, messages: list[dict], content: str, where: str) -> str:
        return content

    def segments(self, messages: list[dict], where: str, first_trained: int = 0) -> list[Segment]:
        self._single_turn(messages, where, with_reply=True)
        return [Segment(self.prompt(messages[:1], where), False), Segment(messages[1]["content"], True)]

    def _single_turn(self, messages: list[dict], where: str, with_reply: bool) -> None:
        roles = [m["role"] for m in messages]
        if "system" in roles:
            raise DataError(f"a system turn needs '{CHAT}' ('{self.template.name}' is a text template with no place "
                            f"for one)", where, self.key)
        if roles != (["user", "assistant"] if with_reply else ["user"]):
            what = "a user turn and its reply" if with_reply else "one user turn"
            turns = f"{len(roles)} turn" + "s" * (len(roles) != 1)
            raise DataError(f"a conversation of {turns} needs '{CHAT}' (the text template "
                            f"'{self.template.name}' renders {what})", where, self.key)


class ChatFormat:
    """The tokenizer's chat template. Trained spans are read off the rendered text, so whatever the
    template inserts between turns stays untrained."""

    chat = True
    special_tokens = False  # the template writes the special tokens it wants (Llama 3 writes BOS)

    def __init__(self, tokenizer, key: str = "data.template"):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no chat template; install one with "
                            f"model.chat_template (e.g. chatml) or use a text template", None, key)
        self.tokenizer, self.key = tokenizer, key
        self._check_renders_content()
        self.end = end_of_turn(tokenizer)  # e.g. '<|im_end|>', '<|eot_id|>'
        self.eos = self.end is None  # a template that writes no end-of-turn token: EOS ends each reply

    def _check_renders_content(self) -> None:
        """A template that drops the assistant's reply (or writes a constant) would train on end-of-turn tokens
        alone; a probe reply must appear in what the template writes for it."""
        probe = [{"role": "user", "content": "Q"}]
        reply = "rlhf probe reply 7f3a"
        try:
            before = self.render(probe, True, "a probe conversation")
            through = self.render(probe + [{"role": "assistant", "content": reply}], False, "a probe conversation")
        except UserError:
            return  # a template that refuses a plain user/assistant pair: the records' own rendering says why
        if reply not in through[len(before):]:
            raise UserError("the chat template never writes the assistant's content (a probe reply is missing from "
                            "its rendering): training would learn end-of-turn tokens only", None, self.key)

    @property
    def signature(self) -> tuple:
        """What the format writes: two formats with the same signature render any record alike."""
        return ("chat", self.tokenizer.chat_template)

    def render(self, messages: list[dict], generation: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(_clean(messages), tokenize=False,
                                                      add_generation_prompt=generation)
        except TemplateError as err:
            raise DataError(f"the chat template refuses this conversation: {err}", where, self.key) from None
        except Exception as err:  # a template that raises anything else while rendering: the key that names it
            raise DataError(f"the chat template failed while rendering ({describe(err)})", where, self.key) from None

    def prompt(self, messages: list[dict], where: str) -> str:
        return self.render(messages, True, where)

    def reply(self, messages: list[dict], content: str, where: str) -> str:
        before, through = self._turn(messages, len(messages), {"role": "assistant", "content": content}, where)
        return self._span(before, through)

    def segments(self, messages: list[dict], where: str, first_trained: int = 0) -> list[Segment]:
        """Untrained text, trained assistant turn, untrained text, ... (ending on a trained turn).

        For each assistant turn i: the conversation up to it rendered with the generation prompt, and up
        to and including it, are both prefixes of the whole rendering; the trained span is the text
        between them (content + end-of-turn token, without what the template writes after it)."""
        full = self.render(messages, False, where)
        out, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first_trained:
                continue
            before, through = self._turn(messages, i, m, where)
            if not full.startswith(through) or len(before) < pos:
                raise self._unstable(where)
            span = self._span(before, through)
            out += [Segment(full[pos:len(before)], False), Segment(span, True)]
            pos = len(before) + len(span)
        return out

    def _span(self, before: str, through: str) -> str:
        """The trained text of a reply: what the template writes for it, up to and including its end-of-turn
        token; what follows (whitespace, the EOS that Phi-3's template writes after the last turn) is not the
        model's to generate: it stops at the end of turn."""
        span = through[len(before):].rstrip()
        cut = span.find(self.end) if self.end else -1
        return span[:cut + len(self.end)] if cut >= 0 else span

    def _turn(self, messages: list[dict], i: int, reply: dict, where: str) -> tuple[str, str]:
        before = self.render(messages[:i], True, where)
        through = self.render(messages[:i] + [reply], False, where)
        if not through.startswith(before):
            raise self._unstable(where)
        return before, through

    def _unstable(self, where: str) -> DataError:
        return DataError(f"the chat template of {self.tokenizer.name_or_path} is not prefix-stable (rendering the "
                         f"turns before a reply with the generation prompt does not begin the rendering with the "
                         f"reply), so its trained spans cannot be found", where, self.key)


def make_format(template: str, tokenizer=None, key: str = "data.template") -> TextFormat | ChatFormat:
    """The format a recipe's `data.template` names: 'chat' (the tokenizer's template) or a text template."""
    if template == CHAT:
        if tokenizer is None:
            raise UserError(f"'{CHAT}' renders with the model's tokenizer, and none was given", None, key)
        return ChatFormat(tokenizer, key)
    return TextFormat(load_template(template, key), key)


def end_of_turn(tokenizer) -> str | None:
    """The special token a chat template writes after an assistant reply ('<|im_end|>', '<|eot_id|>', or
    EOS for a template made from a text template), or None when it writes none / renders no probe."""
    probe = [{"role": "user", "content": "Q"}]
    try:
        before = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": "A"}], tokenize=False)
    except (TemplateError, ValueError):
        return None
    reply = through[len(before):].lstrip()  # Mistral's template writes ' ' + content
    if not through.startswith(before) or not reply.startswith("A"):
        return None
    after = reply[1:].lstrip()
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return next((t for t in sorted(specials, key=len, reverse=True) if after.startswith(t)), None)


# ---------------------------------------------------------------------------------------------
# chat templates written into tokenizers


def installed_tokens(source: str) -> list[str]:
    """The special tokens a template declares on its first line: `{#- special tokens: <|a|> <|b|> -#}`."""
    match = TOKENS_DECLARATION.match(source)
    return match.group(1).split() if match else []


def render_conversation(source: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered by the chat template `source` without a tokenizer, by transformers' own renderer (the
    one `apply_chat_template` uses); no special tokens are defined, so nothing is written before the first turn
    unless the template itself writes it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=source, add_generation_prompt=add_generation_prompt)
    return rendered[0]


def load_chat_template(name_or_path: str, key: str = "model.chat_template") -> str:
    """A shipped template by name (`chatml`) or a .jinja file."""
    path = Path(name_or_path)
    if path.suffix != ".jinja":
        path = TEMPLATE_DIR / f"{name_or_path}.jinja"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
            raise UserError(f"unknown chat template {name_or_path!r} (shipped: {known}, or a .jinja file)", None, key)
    elif not path.is_file():
        raise UserError(f"chat template file {name_or_path} not found", None, key)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", str(path), key) from None


def prefix_jinja(tokenizer) -> str:
    """Jinja that writes the special tokens the tokenizer puts before a text (BOS for Llama-style
    tokenizers, nothing for GPT-2 style): a chat template that writes them gives the ids training saw."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    head = next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
    if not head:
        return ""
    if head == [tokenizer.bos_token_id]:
        return "{{- bos_token -}}"
    return "{{- " + jinja_literal(tokenizer.decode(head)) + " -}}"


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads literals with Python's unicode escapes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def text_chat_template(template: Template, prefix: str = "") -> str:
    """A Jinja chat template that renders exactly what the text template trained: one user message ->
    `prefix` + its prompt (the generation prompt is the prompt itself); with the assistant's reply ->
    + reply + EOS. Anything else (a system turn, several turns) raises with a clear message."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template.prompt_no_input):
        if literal:
            parts.append("{{- " + jinja_literal(literal) + " -}}")
        if name:
            parts.append("{{- messages[0]['content'] -}}")
    refuse = jinja_literal(f"this model was fine-tuned with the single-turn text template '{template.name}': send "
                           f"one user message (optionally followed by the assistant's reply), no system message")
    declared = json.dumps({"name": template.name, "prompt_input": template.prompt_input,
                           "prompt_no_input": template.prompt_no_input}).replace("#}", "#\\u007d")
    return (TEXT_TEMPLATE_DECLARATION + declared + " -#}"
            "{%- if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' or "
            "(messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
            "{{- raise_exception(" + refuse + ") -}}{%- endif -%}"
            + prefix + "".join(parts)
            + "{%- if messages | length == 2 -%}{{- messages[1]['content'] + eos_token -}}{%- endif -%}")


def declared_text_template(chat_template: str | None) -> Template | None:
    """The text template a chat template made by `text_chat_template` renders (None for any other)."""
    if not chat_template or not chat_template.startswith(TEXT_TEMPLATE_DECLARATION):
        return None
    fields = json.loads(chat_template[len(TEXT_TEMPLATE_DECLARATION):chat_template.index(" -#}")])
    return Template(fields["name"], fields["prompt_input"], fields["prompt_no_input"], "")


def install_template(tokenizer, name_or_path: str, key: str = "model.chat_template") -> None:
    """Install `model.chat_template` (a shipped name or a .jinja file) and the special tokens it declares.

    Unless the template writes `bos_token` itself, it is preceded by the special tokens the tokenizer puts
    before a text (BOS for Llama-style tokenizers): documents began with them in pretraining."""
    source = load_chat_template(name_or_path, key)
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    missing = [t for t in installed_tokens(source) if t not in specials]
    new = [t for t in missing if t not in tokenizer.get_vocab()]
    if missing:  # tokens already in the vocabulary keep their ids, and are made special
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if "bos_token" not in source:
        source = prefix_jinja(tokenizer) + source
    replaced = " (replacing the tokenizer's own)" if tokenizer.chat_template else ""
    added = f", special tokens added: {' '.join(new)}" if new else ""
    note(f"chat template: {name_or_path}{replaced}{added}")
    tokenizer.chat_template = source


def install_chat_template(tokenizer, template: str, key: str = "data.template") -> None:
    """Make the tokenizer's chat template render the format `template` trains: call before saving.

    'chat' keeps the tokenizer's own (or `model.chat_template`'s); a text template replaces any template
    inherited from the base model with one that writes exactly the text template's prompt."""
    if template == CHAT:
        return
    written = text_chat_template(load_template(template, key), prefix_jinja(tokenizer))
    if tokenizer.chat_template and tokenizer.chat_template != written:
        note(f"chat template: the saved tokenizer renders the text template '{template}' it was trained with "
             f"(replacing the chat template it came with)")
    tokenizer.chat_template = written


def note(message: str) -> None:
    """A note to the user, printed once per launch (every process loads and renders)."""
    if os.environ.get("RANK", "0") == "0":
        print(message)
