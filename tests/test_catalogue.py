"""The bad-input catalogue: each case is one line naming file:line or the recipe key, exit code 2, no
traceback, and nothing half-written. Plus `rlhf check` on good and bad recipes."""

from __future__ import annotations

import errno
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf.cli import main
from tests.chain import ROOT, cli_args
from tests.conftest import write_jsonl


def sft_args(chain, tmp_path, *extra):
    return cli_args("sft", chain["root"], "train.max_steps=2", f"output_dir={tmp_path}/out", *extra)


def bad_file(tmp_path: Path, content: bytes, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


GOOD = b'{"instruction": "Reverse the list.", "input": "a b", "output": "b a"}\n'
NO_OUTPUT = b'{"instruction": "x"}'
LIST_TYPED = b'{"instruction": [1], "output": "y"}'
NOT_UTF8 = b'{"instruction": "\xff"}'
CHAT_BAD_ROLE = b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'
CHAT_LIST_CONTENT = b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}'
CHAT_NO_REPLY = b'{"messages": [{"role": "user", "content": "a"}]}'
CHAT_EMPTY = b'{"messages": []}'
CHAT_TWO_TURNS = (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                  b'{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}')
PAIR_DIFFERENT_PROMPTS = (b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
                          b'"rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}')
HUGE_INT = b'{"instruction": "x", "output": "y", "n": ' + b"7" * 5000 + b"}"
DEEP = b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
SURROGATE = b'{"instruction": "x", "output": "\\ud800"}'


def pad_is_eos_model(chain, tmp_path, spare: bool = False) -> Path:
    """A copy of the pretrained model whose tokenizer pads with EOS; unless `spare`, its '<|pad|>' is made an
    ordinary token, so that no special token is left to pad with."""
    folder = tmp_path / "padeos"
    tok = AutoTokenizer.from_pretrained(chain["pretrain"] / "model")
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    if not spare:
        config = json.loads((folder / "tokenizer.json").read_text())
        for token in config["added_tokens"]:
            token["special"] = token["special"] and token["content"] != "<|pad|>"
        (folder / "tokenizer.json").write_text(json.dumps(config))
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((chain["pretrain"] / "model" / f).read_bytes())
    return folder


def template_file(tmp_path: Path, no_input: str) -> Path:
    path = tmp_path / "tpl.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}\n{input}\n", "prompt_no_input": no_input}))
    return path


CASES = {
    "malformed JSONL line": (lambda c, t: [f"data.train={bad_file(t, GOOD + b'{oops}' + GOOD)}"],
                             "{t}/bad.jsonl:2: invalid JSON"),
    "missing field": (lambda c, t: [f"data.train={bad_file(t, GOOD + NO_OUTPUT)}"],
                      "{t}/bad.jsonl:2: output: missing"),
    "wrong-typed field": (lambda c, t: [f"data.train={bad_file(t, LIST_TYPED)}"],
                          "{t}/bad.jsonl:1: instruction: expected a string, got list"),
    "empty file": (lambda c, t: [f"data.train={bad_file(t, b'')}"], "{t}/bad.jsonl: data.train: no valid records"),
    "non-UTF-8 bytes": (lambda c, t: [f"data.train={bad_file(t, GOOD + NOT_UTF8)}"],
                        "{t}/bad.jsonl:2: not valid UTF-8"),
    "all records over-long": (lambda c, t: [f"data.train={c['tasks']}/sft.jsonl", "data.max_len=8"],
                              "data.max_len: all 320 records are too long for 8 tokens"),
    "nonexistent data path": (lambda c, t: ["data.train=runs/none/x.jsonl"],
                              "data.train: data file runs/none/x.jsonl not found"),
    "nonexistent model path": (lambda c, t: ["model.name_or_path=./runs/none"],
                               "model.name_or_path: model path ./runs/none not found"),
    "run folder of the wrong stage": (lambda c, t: [f"model.name_or_path={c['rm']}"],
                                      "model.name_or_path: {c[rm]} is a 'rm' run folder; expected a run of stage"),
    "recipe typo": (lambda c, t: ["train.learning_rate=1e-4"], "train.learning_rate: unknown key"),
    "zero batch size": (lambda c, t: ["train.batch_size=0"], "train.batch_size: must be greater than 0, got 0"),
    "negative learning rate": (lambda c, t: ["train.lr=-0.1"], "train.lr: must be greater than 0, got -0.1"),
    "LoRA targets that match nothing": (lambda c, t: ["lora.target_modules=[nope_proj]"],
                                        "lora.target_modules: ['nope_proj'] matches no module"),
    "QLoRA without a GPU": (lambda c, t: ["lora.quantization=4bit"],
                            "lora.quantization: 4-bit QLoRA needs a CUDA GPU"),
    "tokenizer with pad = eos": (lambda c, t: [f"model.name_or_path={pad_is_eos_model(c, t)}"],
                                 "model.pad_token: the tokenizer of {t}/padeos pads with its EOS token"),
    "template with an unknown placeholder": (
        lambda c, t: [f"data.template={template_file(t, '{ctx}: {instruction}')}"],
        "{t}/tpl.json: prompt_no_input: unknown placeholder {{ctx}}"),
    "template with {input} in its no-input text": (
        lambda c, t: [f"data.template={template_file(t, '{instruction} {input}')}"],
        "{t}/tpl.json: prompt_no_input: unknown placeholder {{input}}"),
    "template file that is not an object": (
        lambda c, t: [f"data.template={bad_file(t, b'[1]', 'tpl.json')}"],
        "{t}/tpl.json: expected a JSON object with prompt_input and prompt_no_input, got list"),
    "corrupt parquet file": (lambda c, t: [f"data.train={bad_file(t, b'PAR1 garbage', 'bad.parquet')}"],
                             "{t}/bad.parquet: cannot read as parquet: "),
    ".json file of JSON lines with a bad line": (
        lambda c, t: [f"data.train={bad_file(t, GOOD + NO_OUTPUT, 'bad.json')}"], "{t}/bad.json:2: output: missing"),
    "infinite learning rate": (lambda c, t: ["train.lr=.inf"],
                               "command line: train.lr: must be a finite number, got inf"),
    "NaN learning rate": (lambda c, t: ["train.lr=nan"], "command line: train.lr: must be a finite number, got 'nan'"),
    "override that changes the stage": (lambda c, t: ["stage=rm"],
                                        "command line: stage: an override cannot change the stage of a 'sft' recipe"),
    "prompt budget not below max_len": (lambda c, t: ["data.max_prompt_len=96"],
                                        "command line: data.max_prompt_len: must be less than max_len (96)"),
    "conversation with an unknown role": (
        lambda c, t: [f"data.train={bad_file(t, GOOD + CHAT_BAD_ROLE)}"],
        "{t}/bad.jsonl:2: messages[1].role: unknown role 'bot' (expected assistant, system, user)"),
    "message content that is not a string": (
        lambda c, t: [f"data.train={bad_file(t, GOOD + CHAT_LIST_CONTENT)}"],
        "{t}/bad.jsonl:2: messages[0].content: expected a string, got list"),
    "empty conversation": (lambda c, t: [f"data.train={bad_file(t, GOOD + CHAT_EMPTY)}"],
                           "{t}/bad.jsonl:2: messages: is empty (no messages)"),
    "conversation with nothing to train": (
        lambda c, t: [f"data.train={bad_file(t, GOOD + CHAT_NO_REPLY)}"],
        "{t}/bad.jsonl:2: messages: has no assistant turn: nothing to train"),
    "multi-turn conversation with a text template": (
        lambda c, t: [f"data.train={bad_file(t, GOOD + CHAT_TWO_TURNS)}"],
        "{t}/bad.jsonl:2: data.template: a conversation of 4 turns needs 'chat' (the text template 'plain'"),
    "data.template chat with a tokenizer that has no chat template": (
        lambda c, t: ["data.template=chat"],
        "data.template: the tokenizer of {c[pretrain]}/model has no chat template"),
    "unknown chat template": (lambda c, t: ["model.chat_template=nope"],
                              "model.chat_template: unknown chat template 'nope' (shipped: chatml"),
    # issue 17: each of these was a traceback and left a half-written .partial
    "output_dir that is a file": (lambda c, t: [f"output_dir={bad_file(t, GOOD)}"],
                                  "output_dir: {t}/bad.jsonl is a file, not a folder"),
    "empty data.train (not the current folder)": (lambda c, t: ["data.train="], "data.train: is empty"),
    "negative seed": (lambda c, t: ["seed=-1"], "command line: seed: must be at least 0, got -1"),
    "seed beyond numpy's range": (lambda c, t: ["seed=123456789012345678901234567890"],
                                  "command line: seed: must be at most 4294967295, got 12345678...(30 digits)"),
    "JSON integer beyond the parser's digit limit": (lambda c, t: [f"data.train={bad_file(t, GOOD + HUGE_INT)}"],
                                                     "{t}/bad.jsonl:2: invalid JSON: Exceeds the limit (4300 digits) "
                                                     "for integer string conversion"),
    "JSON nested too deeply for the parser": (lambda c, t: [f"data.train={bad_file(t, GOOD + DEEP)}"],
                                              "{t}/bad.jsonl:2: invalid JSON: nested too deeply"),
    "JSON string with a lone surrogate": (lambda c, t: [f"data.train={bad_file(t, GOOD + SURROGATE)}"],
                                          "{t}/bad.jsonl:2: output: holds a lone surrogate '\\ud800': not valid "
                                          "Unicode text"),
    "duplicate key in an override's mapping": (lambda c, t: ["train={lr: 0.1, lr: 0.2}"],
                                               "command line: train: duplicate key 'lr' in '{{lr: 0.1, lr: 0.2}}'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(chain, tmp_path, capsys, case):
    make, expected = CASES[case]
    assert main(sft_args(chain, tmp_path, *make(chain, tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=tmp_path, c=chain) in err[0], err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


STAGE_CASES = {
    "pretrain: missing tokenizer.existing": (
        "pretrain", lambda c, t: ["tokenizer.existing=./runs/none"],
        "tokenizer.existing: model path ./runs/none not found"),
    "pretrain: tokenizer.existing pads with eos": (
        "pretrain", lambda c, t: [f"tokenizer.existing={pad_is_eos_model(c, t)}"],
        "tokenizer.pad_token: the tokenizer of {t}/padeos pads with its EOS token"),
    "dpo: ipo with label smoothing": (
        "dpo", lambda c, t: ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
        "command line: dpo.label_smoothing: applies to loss_type 'sigmoid' only"),
    "rm: prompt budget above max_len": (
        "rm", lambda c, t: ["data.max_prompt_len=200"],
        "command line: data.max_prompt_len: must be less than max_len (96)"),
    "tasks: one-letter alphabet": (
        "tasks", lambda c, t: ["tasks.alphabet=a"],
        "command line: tasks.alphabet: expected at least 2 distinct letters"),
    "tasks: capital letters": (
        "tasks", lambda c, t: ["tasks.alphabet=abcXYZ"],
        "command line: tasks.alphabet: expected lowercase ASCII letters a-z only, got 'XYZ'"),
    "rm: conversational pair whose prompts differ": (
        "rm", lambda c, t: [f"data.train={bad_file(t, PAIR_DIFFERENT_PROMPTS)}", "data.eval=null"],
        "{t}/bad.jsonl:1: rejected: chosen and rejected differ before their last turn"),
    "dpo: chat template file that does not exist": (
        "dpo", lambda c, t: [f"model.chat_template={t}/none.jinja"],
        "model.chat_template: chat template file {t}/none.jinja not found"),
}


def pairs_with_margin(tmp_path: Path, margin: bytes) -> Path:
    pair = b'{"prompt": "a", "chosen": "b", "rejected": "c", "margin": ' + margin + b'}\n'
    return bad_file(tmp_path, pair, "p.jsonl")


STAGE_CASES.update({
    # a NaN margin made every rm step NaN: all skipped, and a "finished" reward model with std 1e-6
    "rm: NaN margin": ("rm", lambda c, t: [f"data.train={pairs_with_margin(t, b'NaN')}", "data.eval=null"],
                       "{t}/p.jsonl:1: margin: must be a finite number, got nan"),
    "rm: infinite margin": ("rm", lambda c, t: [f"data.train={pairs_with_margin(t, b'-Infinity')}", "data.eval=null"],
                            "{t}/p.jsonl:1: margin: must be a finite number, got -inf"),
    "rm: margin beyond the float range": (
        "rm", lambda c, t: [f"data.train={pairs_with_margin(t, b'1' + b'0' * 400)}", "data.eval=null"],
        "{t}/p.jsonl:1: margin: must be a finite number, got 100000000000...(401 digits)"),
    "tasks: unknown corpus template": ("tasks", lambda c, t: ["tasks.corpus_template=chatml2"],
                                       "tasks.corpus_template: unknown chat template 'chatml2' (shipped: chatml"),
    "pretrain: unknown chat template": ("pretrain", lambda c, t: ["tokenizer.chat_template=chatml2"],
                                        "tokenizer.chat_template: unknown chat template 'chatml2'"),
    "sft: trainable token not in the vocabulary": (
        "sft", lambda c, t: ["lora.trainable_tokens=[<|eot_id|>]"],
        "lora.trainable_tokens: '<|eot_id|>' not in the tokenizer's vocabulary"),
    # checked when the recipe loads, not by save_pretrained after the parity check
    "export: bad max_shard_size": ("export", lambda c, t: [f"source={c['sft']}", "export.max_shard_size=5XB"],
                                   "command line: export.max_shard_size: expected a positive whole number with a "
                                   "unit"),
})


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_bad_input_of_other_stages_is_one_line_and_exit_2(chain, tmp_path, capsys, case):
    stage, make, expected = STAGE_CASES[case]
    args = cli_args(stage, chain["root"], f"output_dir={tmp_path}/out", *make(chain, tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=tmp_path, c=chain) in err[0], err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def assert_one_error_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]


def test_duplicate_keys_in_a_recipe_are_an_error_naming_the_key_and_line(chain, tmp_path, capsys):
    args = sft_args(chain, tmp_path)
    recipe = tmp_path / "dup.yaml"
    text = Path(args[1]).read_text()
    assert "\ntrain:\n" in text
    recipe.write_text(text.replace("\ntrain:\n", "\ntrain:\n  lr: 0.1\n  lr: 0.2\n", 1))
    line = recipe.read_text().splitlines().index("  lr: 0.2") + 1
    assert main([args[0], str(recipe), *args[2:]]) == 2
    assert_one_error_line(capsys.readouterr().err, f"error: {recipe}:{line}: lr: duplicate key (first given on line "
                                                   f"{line - 1}); YAML would silently keep only the last value")


def test_a_bad_world_size_is_one_line(chain, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(sft_args(chain, tmp_path)) == 2
    assert_one_error_line(capsys.readouterr().err, "error: environment: WORLD_SIZE='two' is not a positive whole "
                                                   "number")


@pytest.fixture
def deny(request, monkeypatch):
    """Make a path unreadable (or, with write=True, a folder read-only). Root ignores permission bits, so as
    root the OS calls that would meet them raise the same PermissionError (EACCES) instead."""
    def make(path: Path, write: bool = False) -> Path:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0o555 if write else 0o000)
            request.addfinalizer(lambda: path.chmod(mode))
            return path
        target = os.path.abspath(path)

        def hit(p) -> bool:
            if not isinstance(p, (str, os.PathLike)):  # a file descriptor (shutil.rmtree scans by fd)
                return False
            p = os.path.abspath(os.fspath(p))
            return p == target or (not write and p.startswith(target + os.sep)) or (write and
                                                                                  os.path.dirname(p) == target)

        def refuse(real):
            def call(p, *args, **kwargs):
                if hit(p):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
                return real(p, *args, **kwargs)
            return call

        if write:
            monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
        else:
            for name in ("read_text", "read_bytes"):
                monkeypatch.setattr(Path, name, refuse(getattr(Path, name)))
            monkeypatch.setattr(os, "scandir", refuse(os.scandir))
        return path
    return make


UNREADABLE = {
    "recipe": lambda c, t, deny: ([], "cannot read: Permission denied"),
    "template": lambda c, t, deny: ([f"data.template={deny(template_file(t, '{instruction}'))}"],
                                    "{t}/tpl.json: cannot read: Permission denied"),
    # today's rglob skipped an unreadable subfolder silently, dropping part of the data
    "data subfolder": lambda c, t, deny: ([f"data.train={data_folder(c, t, deny)}"],
                                          "data.train: cannot read folder {t}/data/part2: Permission denied"),
    "read-only parent folder": lambda c, t, deny: ([f"output_dir={deny(readonly_parent(t), write=True)}/out"],
                                                   "output_dir: cannot create {t}/ro/out.partial: Permission denied"),
}


def data_folder(chain, tmp_path: Path, deny) -> Path:
    rows = (chain["tasks"] / "sft.jsonl").read_text().splitlines()
    for part, chunk in (("part1", rows[:160]), ("part2", rows[160:])):
        (tmp_path / "data" / part).mkdir(parents=True)
        (tmp_path / "data" / part / "sft.jsonl").write_text("\n".join(chunk) + "\n")
    deny(tmp_path / "data" / "part2")
    return tmp_path / "data"


def readonly_parent(tmp_path: Path) -> Path:
    (tmp_path / "ro").mkdir()
    return tmp_path / "ro"


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_files_and_folders_are_one_line(chain, tmp_path, capsys, deny, case):
    extra, expected = UNREADABLE[case](chain, tmp_path, deny)
    args = sft_args(chain, tmp_path, *extra)
    if case == "recipe":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(Path(args[1]).read_text())
        args[1] = str(deny(recipe))
        expected = f"{recipe}: {expected}"
    assert main(args) == 2
    assert_one_error_line(capsys.readouterr().err, expected.format(t=tmp_path))
    assert not list(tmp_path.rglob("*.partial"))


def test_a_data_folder_matches_suffixes_of_any_case_and_lists_other_files(chain, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(chain["tasks"] / "sft.jsonl", folder / "SFT.JSONL")
    (folder / "notes.txt").write_text("not data\n")
    (folder / "train.csv").write_text("a,b\n")
    assert main(sft_args(chain, tmp_path, f"data.train={folder}", "data.max_records=64")) == 0
    err = capsys.readouterr().err
    assert (f"warning: data.train: {folder} holds 2 file(s) of unknown type, not read: notes.txt, train.csv "
            f"(data files end in .jsonl/.json/.parquet)") in err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]["train_records"] == 64


def test_existing_tokenizer_goes_through_the_loader(chain, tmp_path):
    from rlhf.sections import TokenizerSection
    from stages.pretrain import train_tokenizer

    tok = train_tokenizer([], TokenizerSection(existing=str(chain["pretrain"])), 64)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    tok = train_tokenizer([], TokenizerSection(existing=str(pad_is_eos_model(chain, tmp_path)), pad_token="<pad2>"), 64)
    assert tok.pad_token == "<pad2>" and tok.pad_token_id != tok.eos_token_id


def test_skipped_records_are_counted_in_the_manifest(chain, tmp_path):
    rows = [{"instruction": "Reverse the list.", "input": f"a {c}", "output": f"{c} a"} for c in "bcdefghijklmnopq"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]) + "{broken\n" + NO_OUTPUT.decode() + "\n"
                    + "".join(json.dumps(r) + "\n" for r in rows[8:]))
    assert main(sft_args(chain, tmp_path, f"data.train={data}", "data.skip_invalid=true", "data.eval=null",
                         "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=1", "train.eval_every=0",
                         "samples=0")) == 0
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]
    assert counts["train_records"] == 16 and counts["invalid_skipped"] == 2
    assert counts["first_invalid"].startswith(f"error: {data}:9: invalid JSON")


def test_wrong_stage_reward_model_and_hh_mismatch(chain, tmp_path, capsys):
    args = cli_args("ppo", chain["root"], f"ppo.reward_model={chain['sft']}", f"output_dir={tmp_path}/p")
    assert main(args) == 2
    assert "ppo.reward_model: " in capsys.readouterr().err
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: x",
                                               "rejected": "\n\nHuman: b\n\nAssistant: y"}])
    assert main(cli_args("rm", chain["root"], f"data.train={hh}", "data.eval=null", f"output_dir={tmp_path}/r")) == 2
    assert f"error: {hh}:1: rejected: chosen and rejected transcripts differ" in capsys.readouterr().err


def test_extra_fields_are_ignored(chain, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse the list.", "input": f"a {c}",
                                                "output": f"{c} a", "source": "x", "id": i}
                                               for i, c in enumerate("bcdefgh" * 6)])
    assert main(sft_args(chain, tmp_path, f"data.train={data}", "train.batch_size=8", "train.micro_batch_size=4",
                         "data.eval=null", "train.eval_every=0")) == 0


def test_no_traceback_from_the_console(chain, tmp_path):
    args = sft_args(chain, tmp_path, "train.lr=abc")
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: command line: train.lr: expected a number, got 'abc'"


# --- rlhf check ------------------------------------------------------------------------------------------


def check_args(chain, stage: str, *extra: str) -> list[str]:
    args = cli_args(stage, chain["root"], *extra)
    return ["check", args[1], *args[2:]]


# the tiny chain of the tests has no ppo/dpo runs: eval and export point at the runs it has
READY_EXTRA = {"eval": lambda c: [f"eval.models={{base: {c['pretrain']}, sft: {c['sft']}}}"],
               "export": lambda c: [f"source={c['sft']}"]}
SHOWN = {"sft": ["---", "---"], "rm": ["--- chosen"] * 2 + ["--- rejected"] * 2,
         "dpo": ["--- chosen"] * 2 + ["--- rejected"] * 2, "ppo": ["---", "---"], "pretrain": ["---", "---"],
         "eval": ["---", "---"], "export": [], "tasks": []}


@pytest.mark.parametrize("stage", list(SHOWN))
def test_check_ready_recipes(chain, capsys, stage):
    assert main(check_args(chain, stage, *READY_EXTRA.get(stage, lambda c: [])(chain))) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("ready") and f"stage {stage}, valid" in out
    assert [line for line in out.splitlines() if line.startswith("---")] == SHOWN[stage]  # two examples
    if stage == "sft":
        assert "[[" in out and "]]" in out  # trained tokens marked (not a TTY)
        assert "EOS ends the labels of" in out and "dropped as too long" in out
    if stage == "rm":
        assert "reward head reads the last non-pad token" in out
    if stage == "ppo":
        assert "gold prompts: 8 with gold answers" in out
        assert "reward model: reads the policy's token ids (the same vocabulary and format)" in out
    if stage == "pretrain":
        assert "corpus: 1200 documents" in out
    if stage == "eval":
        assert "eval prompts: 16 (16 with gold answers), models: base, sft" in out
    if stage == "export":
        assert "parity prompts: built-in" in out


def gold_less(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "nogold.jsonl", [{"prompt": "Say hi.\n"}, {"prompt": "Say bye.\n"}])


CHECK_CASES = {
    "sft: tokenizer with pad = eos": (
        "sft", lambda c, t: [f"model.name_or_path={pad_is_eos_model(c, t)}"],
        "model.pad_token: the tokenizer of {t}/padeos pads with its EOS token"),
    "ppo: missing gold prompts": (
        "ppo", lambda c, t: [f"ppo.gold_prompts={t}/none.jsonl"],
        "ppo.gold_prompts: data file {t}/none.jsonl not found"),
    "ppo: malformed gold prompts": (
        "ppo", lambda c, t: [f"ppo.gold_prompts={bad_file(t, GOOD + b'{oops}')}"], "{t}/bad.jsonl:2: invalid JSON"),
    "ppo: gold prompts without answers": (
        "ppo", lambda c, t: [f"ppo.gold_prompts={gold_less(t)}"],
        "{t}/nogold.jsonl: ppo.gold_prompts: no record has a gold answer"),
    "pretrain: missing corpus": (
        "pretrain", lambda c, t: [f"data.train=[{t}/none.txt]"], "data.train: corpus file {t}/none.txt not found"),
    "pretrain: tokenizer.existing pads with eos": (
        "pretrain", lambda c, t: [f"tokenizer.existing={pad_is_eos_model(c, t)}"],
        "tokenizer.pad_token: the tokenizer of {t}/padeos pads with its EOS token"),
    "eval: malformed prompts": (
        "eval", lambda c, t: [*READY_EXTRA["eval"](c), f"eval.prompts={bad_file(t, GOOD + NOT_UTF8)}"],
        "{t}/bad.jsonl:2: not valid UTF-8"),
    "eval: model tokenizer pads with eos": (
        "eval", lambda c, t: [f"eval.models={{padeos: {pad_is_eos_model(c, t)}}}"],
        "the tokenizer of {t}/padeos pads with its EOS token"),
    "export: malformed parity prompts": (
        "export", lambda c, t: [*READY_EXTRA["export"](c), f"export.parity_prompts={bad_file(t, LIST_TYPED)}"],
        "{t}/bad.jsonl:1: instruction: expected a string, got list"),
    "export: missing parity prompts": (
        "export", lambda c, t: [*READY_EXTRA["export"](c), f"export.parity_prompts={t}/none.jsonl"],
        "export.parity_prompts: data file {t}/none.jsonl not found"),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_fails_on_bad_input(chain, tmp_path, capsys, case):
    stage, make, expected = CHECK_CASES[case]
    assert main(check_args(chain, stage, *make(chain, tmp_path))) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=tmp_path, c=chain) in err[0], err[0]
    assert "ready" not in captured.out


def test_check_pads_with_a_spare_special_token(chain, tmp_path, capsys):
    """A tokenizer that pads with EOS but has a spare special token pads with it: no embedding row added."""
    assert main(check_args(chain, "sft", f"model.name_or_path={pad_is_eos_model(chain, tmp_path, spare=True)}")) == 0
    out = capsys.readouterr().out
    assert "pad token: '<|pad|>' (id 0), an existing special token that is neither a stop token nor written by the " \
           "chat template (the tokenizer padded with its EOS token '</s>')" in out
    assert out.strip().endswith("ready")


def test_check_shows_the_trained_turns_of_a_chat_recipe(chain, tmp_path, capsys):
    """`data.template: chat` on the base model with the shipped ChatML: every assistant turn is marked trained
    (content and <|im_end|>), nothing else."""
    def turn(role, text):
        return {"role": role, "content": text}

    rows = [{"messages": [turn("system", "Answer with the list."), turn("user", f"Reverse the list.\n\na {c}"),
                          turn("assistant", f"{c} a"), turn("user", f"Sort the list.\n\n{c} a"),
                          turn("assistant", f"a {c}")]} for c in "bcdefgh"]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert main(check_args(chain, "sft", f"data.train={data}", "data.eval=null", "data.template=chat",
                           "model.chat_template=chatml", "data.max_len=128")) == 0
    out = capsys.readouterr().out
    assert "chat template: chatml, special tokens added: <|im_start|> <|im_end|>" in out
    assert "the end-of-turn token '<|im_end|>' ends the labels of 7 of 7 examples" in out
    assert "turn-by-turn token ids equal those of the whole rendered conversation in 7 of 7 examples\n" in out
    example = out.split("---\n")[1].split("\n---")[0]
    assert re.findall(r"\[\[(.*?)\]\]", example, re.S) == ["b a<|im_end|>", "a b<|im_end|>"]
    assert example.startswith("<s><|im_start|>system\nAnswer with the list.<|im_end|>")
    assert out.strip().endswith("ready")


def test_check_accepts_truncated_pairs(chain, tmp_path, capsys):
    """Truncated pairs are trained on by rm/dpo: they are reported, not a failure, and not the examples shown."""
    long = [{"instruction": "Reverse the list.", "input": f"a {c}", "chosen": f"{c} a " * 200, "rejected": f"a {c}"}
            for c in "bc"]
    short = [{"instruction": "Reverse the list.", "input": f"a {c}", "chosen": f"{c} a", "rejected": f"a {c}"}
             for c in "defgh"]
    data = write_jsonl(tmp_path / "p.jsonl", long + short)
    assert main(check_args(chain, "rm", f"data.train={data}", "data.eval=null")) == 0
    out = capsys.readouterr().out
    assert "2 truncated" in out and out.strip().endswith("ready")
    assert "reward head reads the last non-pad token of every row: '</s>' (checked" in out
    assert "a " * 20 not in out  # the cut pairs are not the ones shown
    data = write_jsonl(tmp_path / "all.jsonl", long)
    assert main(check_args(chain, "rm", f"data.train={data}", "data.eval=null")) == 0
    out = capsys.readouterr().out
    assert "or the last kept token of a truncated response (2 of 2 shown)" in out and out.strip().endswith("ready")


def test_check_sft_prompt_budget(chain, tmp_path, capsys):
    rows = [{"instruction": "Reverse the list. " * 20, "input": f"a {c}", "output": f"{c} a"} for c in "bcdefg"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(check_args(chain, "sft", f"data.train={data}", "data.eval=null")) == 2
    assert "data.max_len: all 6 records are too long" in capsys.readouterr().err
    assert main(check_args(chain, "sft", f"data.train={data}", "data.eval=null", "data.max_prompt_len=32")) == 0
    out = capsys.readouterr().out
    assert "0 dropped as too long, 6 truncated" in out and "EOS ends the labels of 6 of 6 examples" in out


def test_check_reports_the_first_bad_record(chain, tmp_path, capsys):
    data = bad_file(tmp_path, GOOD + b"{broken\n")
    args = cli_args("sft", chain["root"], f"data.train={data}")
    assert main(["check", args[1], *args[2:]]) == 2
    assert capsys.readouterr().err.strip() == f"error: {data}:2: invalid JSON: Expecting property name enclosed " \
                                              f"in double quotes (column 2)"
    assert json.loads(GOOD)  # the good line itself is fine
