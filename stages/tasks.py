"""`tasks` stage: write the built-in verifiable task suite as ordinary data files.

Output (all JSONL in the formats of data_formats.schemas, plus the corpus as text):
    corpus.txt         pretraining documents separated by blank lines
    sft.jsonl          Alpaca records (a fraction `sft_noise` with plausible wrong outputs)
    sft_eval.jsonl     Alpaca records with correct outputs (held out)
    prefs.jsonl        {"instruction", "input", "chosen", "rejected"} (chosen correct)
    prefs_eval.jsonl   held-out pairs
    prompts.jsonl      prompts for PPO rollouts
    eval_prompts.jsonl held-out prompts with "task" and "answer" (gold scoring)
With `tasks.format: messages` the record files are conversations instead (`tasks.as_conversations`). With
`tasks.corpus_template` (e.g. chatml) the corpus writes the instances it states in the prompt's form as that
template's prompt for the user turn followed by the answer, in corpus.jsonl ({"text"} per document; the user turn
holds a blank line) instead of corpus.txt.
"""

from __future__ import annotations

import json
from pathlib import Path


from data_formats import tasks
from data_formats.chat import load_chat_template, render_conversation
from rlhf.artifacts import RunFolder
from rlhf.errors import UserError
from rlhf.runtime import partial_state
from rlhf.recipes import TasksRecipe


def run(recipe: TasksRecipe) -> Path:
    state = partial_state()
    folder = RunFolder(recipe, state.is_main_process, state.wait_for_everyone)
    if folder.finished:
        return folder.final

    render = None
    if recipe.tasks.corpus_template:
        source = load_chat_template(recipe.tasks.corpus_template, "tasks.corpus_template")
        render = lambda messages: render_conversation(source, messages, add_generation_prompt=True)  # noqa: E731
    try:
        suite = tasks.generate(recipe.tasks, recipe.seed, render)
    except ValueError as err:
        raise UserError(str(err), None, "tasks") from None
    if recipe.tasks.format == "messages":
        suite = tasks.as_conversations(suite)

    files = {}
    if state.is_main_process:
        corpus = suite.pop("corpus")
        if render is None:  # documents separated by blank lines
            name, text = "corpus.txt", "\n\n".join(corpus) + "\n"
        else:  # a chat prompt holds a blank line: one JSON document per line
            name, text = "corpus.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in corpus)
        (folder.partial / name).write_text(text)
        files[name] = recipe.tasks.corpus_documents
        for name, rows in suite.items():
            with open(folder.partial / f"{name}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            files[f"{name}.jsonl"] = len(rows)
        folder.counts = {"records": files}
    return folder.finish(metrics={}, extra={"files": files})
