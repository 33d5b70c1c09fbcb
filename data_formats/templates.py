"""Prompt templates as data: a JSON file with `prompt_input`, `prompt_no_input` and `response_split`."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
# the placeholders each text may (and must) use: render() fills exactly these
FIELDS = {"prompt_input": ("instruction", "input"), "prompt_no_input": ("instruction",)}


@dataclass(frozen=True)
class Template:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt text for an instruction (and optional input); the response follows it directly."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


def available() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name_or_path: str, key: str = "data.template") -> Template:
    """A template by name (`alpaca`, `compact`, ...) or from a JSON file with the same keys.

    Its placeholders are checked here, so a bad template is one line naming the file and field, not a
    KeyError in the middle of tokenization."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = TEMPLATE_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise UserError(f"unknown template {name_or_path!r} (known: {', '.join(available())}, or a .json file)",
                            None, key)
    elif not path.is_file():
        raise UserError(f"template file {name_or_path} not found", None, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON: {err.msg}", f"{path}:{err.lineno}") from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", str(path)) from None
    except (ValueError, RecursionError):  # the parser's digit limit, or nesting beyond the recursion limit
        raise UserError("invalid JSON: a number too long or nesting too deep for the parser", str(path)) from None
    except OSError as err:  # permissions, a broken network mount
        raise UserError(f"cannot read: {err.strerror or err}", str(path)) from None
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object with prompt_input and prompt_no_input, got {type(data).__name__}",
                        str(path))
    for field, allowed in FIELDS.items():
        _check_placeholders(data.get(field), allowed, str(path), field)
    split = data.get("response_split", "")
    if not isinstance(split, str):
        raise UserError(f"expected a string, got {type(split).__name__}", str(path), "response_split")
    return Template(name=path.stem, prompt_input=data["prompt_input"], prompt_no_input=data["prompt_no_input"],
                    response_split=split)


def _check_placeholders(text, allowed: tuple[str, ...], where: str, field: str) -> None:
    """Reject at load what would fail at render time (KeyError/IndexError/AttributeError in str.format)."""
    if text is None:
        raise UserError("missing", where, field)
    if not isinstance(text, str):
        raise UserError(f"expected a string, got {type(text).__name__}", where, field)
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as err:  # a single '{' or '}' (literal braces are written '{{' and '}}')
        raise UserError(f"{err} (write literal braces as {{{{ and }}}})", where, field) from None
    names = ", ".join("{" + a + "}" for a in allowed)
    used = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed:
            hint = " ({input} belongs in prompt_input only)" if name == "input" else ""
            raise UserError(f"unknown placeholder {{{name}}}; allowed here: {names}{hint}", where, field)
        if spec or conversion:
            raise UserError(f"placeholder {{{name}}} takes no format spec or conversion", where, field)
        used.add(name)
    missing = [a for a in allowed if a not in used]
    if missing:
        raise UserError(f"has no {{{missing[0]}}} placeholder (render() would drop it)", where, field)
