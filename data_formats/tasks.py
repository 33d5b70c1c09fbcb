"""The built-in verifiable task suite: instruction tasks whose answers a program checks exactly.

Each task works on a short list of letters written with spaces ("c a f b"), so every item is one token
for a byte-level BPE and a model of a few million parameters learns the families on a CPU in minutes.

Families (difficulty knobs: list length `min_items..max_items`, alphabet size):
    reverse   "Reverse the list."                       c a f b -> b f a c
    sort      "Sort the list in alphabetical order."    c a f b -> a b c f
    upper     "Write the list in capital letters."      c a f b -> C A F B
    max       "Which letter comes last in the alphabet?" c a f b -> f
    count     "How many letters are in the list?"       c a f b -> 4

From one seed the suite emits a pretraining corpus, an Alpaca SFT set (a fraction `sft_noise` of its
answers replaced by plausible wrong ones, like imperfect human demonstrations), pairwise preferences
(chosen = correct, rejected = a plausible wrong answer), PPO prompts and held-out evaluation prompts,
all disjoint from one another, plus `grade`, the gold scorer. `as_conversations` rewrites the record
splits in the conversational forms (`messages`; chosen/rejected turns).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from data_formats.chat import user_message

Items = list[str]


@dataclass(frozen=True)
class Family:
    instruction: str
    solve: Callable[[Items], str]
    # corrupt(rng, items, alphabet) -> a plausible wrong answer (never equal to solve(items))
    corrupt: Callable[[random.Random, Items, str], str]
    # how the pretraining corpus states solved instances (surface forms other than the prompt's; one puts
    # the lists at line starts, where the response of an instruction prompt also starts)
    statements: tuple[str, ...]


def _join(items: Items) -> str:
    return " ".join(items)


def _swap_adjacent(rng: random.Random, items: Items) -> Items | None:
    spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    out = list(items)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _slips(rng: random.Random, answer: Items, alphabet: str) -> list[Items]:
    """Generic mistakes on a list answer: one item replaced, one dropped, one extra."""
    upper = answer[0].isupper()
    letters = [c.upper() if upper else c for c in alphabet]
    i = rng.randrange(len(answer))
    replaced = list(answer)
    replaced[i] = rng.choice([c for c in letters if c != answer[i]])
    extra = list(answer)
    extra.insert(rng.randrange(len(answer) + 1), rng.choice(letters))
    out = [replaced, extra]
    if len(answer) > 1:
        out.append(answer[:i] + answer[i + 1:])
    return out


def _wrong_order(solved: Callable[[Items], Items]) -> Callable[[random.Random, Items, str], str]:
    """Wrong answers for reordering tasks: the input unchanged, one adjacent swap, or a generic slip."""

    def corrupt(rng: random.Random, items: Items, alphabet: str) -> str:
        right = solved(items)
        options = _slips(rng, right, alphabet)
        if items != right:
            options.append(items)
        swapped = _swap_adjacent(rng, right)
        if swapped is not None:
            options.append(swapped)
        return _join(rng.choice(options))

    return corrupt


def _upper_wrong(rng: random.Random, items: Items, alphabet: str) -> str:
    right = [x.upper() for x in items]
    i = rng.randrange(len(items))
    options = _slips(rng, right, alphabet) + [[x if j == i else x.upper() for j, x in enumerate(items)]]
    return _join(rng.choice(options))


def _max_wrong(rng: random.Random, items: Items, alphabet: str) -> str:
    top = max(items)
    return rng.choice([c for c in alphabet if c != top])


def _count_wrong(rng: random.Random, items: Items, alphabet: str) -> str:
    n = len(items)
    return str(rng.choice([m for m in (n - 2, n - 1, n + 1, n + 2) if m > 0]))


FAMILIES: dict[str, Family] = {
    "reverse": Family("Reverse the list.", lambda xs: _join(xs[::-1]), _wrong_order(lambda xs: xs[::-1]),
                      ("reversed, {x} reads {y}.", "Reverse the list.\n{x}\n{y}")),
    "sort": Family("Sort the list in alphabetical order.", lambda xs: _join(sorted(xs)),
                   _wrong_order(sorted),
                   ("in alphabetical order, {x} is {y}.", "Sort the list in alphabetical order.\n{x}\n{y}")),
    "upper": Family("Write the list in capital letters.", lambda xs: _join([x.upper() for x in xs]), _upper_wrong,
                    ("in capitals, {x} is {y}.", "Write the list in capital letters.\n{x}\n{y}")),
    "max": Family("Which letter comes last in the alphabet?", lambda xs: max(xs), _max_wrong,
                  ("of {x}, the last in the alphabet is {y}.", "Which letter comes last in the alphabet?\n{x}\n{y}")),
    "count": Family("How many letters are in the list?", lambda xs: str(len(xs)), _count_wrong,
                    ("the list {x} has {y} letters.", "How many letters are in the list?\n{x}\n{y}")),
}


def normalize(text: str) -> str:
    """Whitespace collapsed and stripped: a completion must be exactly the answer (nothing after it)."""
    return " ".join(text.split())


def grade(meta: dict, completion: str) -> bool:
    """Gold scorer: does `completion` answer the task in `meta` ({'task', 'input' or 'answer'})?"""
    family = FAMILIES[meta["task"]]
    answer = meta.get("answer")
    if answer is None:
        answer = family.solve(meta["input"].split())
    return normalize(completion) == normalize(answer)


def has_gold(meta: dict) -> bool:
    return meta.get("task") in FAMILIES and ("answer" in meta or "input" in meta)


def alphabet_problem(alphabet: str) -> str | None:
    """Why `alphabet` cannot make tasks, or None. Wrong answers replace a letter by another one (so two
    distinct letters are needed), and `upper` must change every letter (so only a-z: 'Z'.upper() or '1'.upper()
    would leave the corrupted answer equal to the right one)."""
    bad = sorted({c for c in alphabet if not ("a" <= c <= "z")})
    if bad:
        return f"expected lowercase ASCII letters a-z only, got {''.join(bad)!r} in {alphabet!r}"
    if len(set(alphabet)) < 2:
        return f"expected at least 2 distinct letters, got {alphabet!r}"
    return None


def _instances(cfg, rng: random.Random, n: int, seen: set) -> list[tuple[str, Items]]:
    out = []
    letters = list(cfg.alphabet)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError("the task space is too small for the requested record counts; raise max_items "
                             "or the alphabet size")
        family = rng.choice(cfg.families)
        items = [rng.choice(letters) for _ in range(rng.randint(cfg.min_items, cfg.max_items))]
        key = (family, tuple(items))
        if key in seen:
            continue
        seen.add(key)
        out.append((family, items))
    return out


def _record(family: str, items: Items) -> dict:
    return {"instruction": FAMILIES[family].instruction, "input": _join(items), "task": family,
            "answer": FAMILIES[family].solve(items)}


def generate(cfg, seed: int, render: Callable[[list[dict]], str] | None = None) -> dict[str, list]:
    """All splits of the suite from one seed (deterministic). `cfg` is a TaskSuiteSection. `render`: the prompt of
    a chat template for the user turn [{'role': 'user', ...}] (`user_message`): the corpus then states an instance
    in the prompt's form as that prompt followed by the answer, as the plain form is the plain template's prompt
    followed by the answer (neither ends the answer: ending a reply is what SFT teaches). None = the plain form. It
    draws no random numbers: every split but the corpus's text is the same either way."""
    unknown = [f for f in cfg.families if f not in FAMILIES]
    if unknown or not cfg.families:
        raise ValueError(f"families: expected names from {', '.join(FAMILIES)}, got {cfg.families}")
    problem = alphabet_problem(cfg.alphabet)
    if problem:
        raise ValueError(f"alphabet: {problem}")
    rng = random.Random(seed)
    seen: set = set()
    # held-out instances first, so that no training split can contain them
    eval_prompts = _instances(cfg, rng, cfg.eval_records, seen)
    sft_eval = _instances(cfg, rng, cfg.eval_records, seen)
    pref_eval = _instances(cfg, rng, cfg.eval_records, seen)
    held_out = set(seen)
    sft = _instances(cfg, rng, cfg.sft_records, seen)
    prefs = _instances(cfg, rng, cfg.preference_records, seen)
    prompts = _instances(cfg, rng, cfg.prompt_records, seen)

    def sft_row(family: str, items: Items, noise: float) -> dict:
        row = _record(family, items)
        wrong = rng.random() < noise
        row["output"] = FAMILIES[family].corrupt(rng, items, cfg.alphabet) if wrong else row["answer"]
        return row

    def pref_row(family: str, items: Items) -> dict:
        row = _record(family, items)
        row["chosen"] = row["answer"]
        row["rejected"] = FAMILIES[family].corrupt(rng, items, cfg.alphabet)
        return row

    corpus = []
    letters = list(cfg.alphabet)
    rng_corpus = random.Random(seed + 1)  # its own stream: the corpus does not move when split sizes change
    for _ in range(cfg.corpus_documents):
        lines = []
        for _ in range(rng_corpus.randint(3, 8)):
            family = rng_corpus.choice(cfg.families)
            items = [rng_corpus.choice(letters) for _ in range(rng_corpus.randint(cfg.min_items, cfg.max_items))]
            if (family, tuple(items)) in held_out:
                continue  # the held-out instances never appear anywhere in training data
            form = rng_corpus.choice(FAMILIES[family].statements)
            if render is not None and form.startswith(FAMILIES[family].instruction):
                user = user_message(FAMILIES[family].instruction, _join(items))
                lines.append(render([{"role": "user", "content": user["content"]}]) + FAMILIES[family].solve(items))
            else:
                lines.append(form.format(x=_join(items), y=FAMILIES[family].solve(items)))
        corpus.append("\n".join(lines))

    return {
        "corpus": corpus,
        "sft": [sft_row(f, xs, cfg.sft_noise) for f, xs in sft],
        "sft_eval": [sft_row(f, xs, 0.0) for f, xs in sft_eval],
        "prefs": [pref_row(f, xs) for f, xs in prefs],
        "prefs_eval": [pref_row(f, xs) for f, xs in pref_eval],
        "prompts": [_record(f, xs) for f, xs in prompts],
        "eval_prompts": [_record(f, xs) for f, xs in eval_prompts],
    }


def as_conversations(suite: dict[str, list]) -> dict[str, list]:
    """The record splits as conversations: SFT {"messages": [user, assistant]}, preferences {"chosen":
    [user, assistant], "rejected": [user, assistant]} (the shared user turn is the prompt, as in
    UltraFeedback-binarized), prompts {"messages": [user]}; `task` and `answer` are kept (gold scoring).
    The user turn is what `data.template: chat` makes of the Alpaca record, so both forms train alike."""

    def turns(row: dict, reply: str | None = None) -> list[dict]:
        user = {"role": "user", "content": user_message(row["instruction"], row["input"])["content"]}
        return [user] + ([{"role": "assistant", "content": reply}] if reply is not None else [])

    def convert(name: str, row: dict) -> dict:
        gold = {"task": row["task"], "answer": row["answer"]}
        if name in ("sft", "sft_eval"):
            return {"messages": turns(row, row["output"]), **gold}
        if name in ("prefs", "prefs_eval"):
            return {"chosen": turns(row, row["chosen"]), "rejected": turns(row, row["rejected"]), **gold}
        return {"messages": turns(row), **gold}

    return {name: rows if name == "corpus" else [convert(name, row) for row in rows] for name, rows in suite.items()}
