"""Prompt templates as data: a JSON file with `prompt_input`, `prompt_no_input` and `response_split`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"


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
    """A template by name (`alpaca`, `compact`, ...) or from a JSON file with the same keys."""
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"not a valid JSON template ({err})", str(path), key) from None
    missing = [k for k in ("prompt_input", "prompt_no_input") if not isinstance(data.get(k), str)]
    if missing:
        raise UserError(f"template lacks {', '.join(missing)}", str(path), key)
    for k in ("prompt_input", "prompt_no_input"):
        if "{instruction}" not in data[k]:
            raise UserError(f"{k} has no {{instruction}} placeholder", str(path), key)
    return Template(name=path.stem, prompt_input=data["prompt_input"], prompt_no_input=data["prompt_no_input"],
                    response_split=data.get("response_split", ""))
