"""The bad-input catalogue: each case is one line naming file:line or the recipe key, exit code 2, no
traceback, and nothing half-written. Plus `rlhf check` on good and bad recipes."""

from __future__ import annotations

import json
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


def pad_is_eos_model(chain, tmp_path) -> Path:
    """A copy of the pretrained model whose tokenizer pads with EOS."""
    folder = tmp_path / "padeos"
    tok = AutoTokenizer.from_pretrained(chain["pretrain"] / "model")
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((chain["pretrain"] / "model" / f).read_bytes())
    return folder


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(chain, tmp_path, capsys, case):
    make, expected = CASES[case]
    assert main(sft_args(chain, tmp_path, *make(chain, tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=tmp_path, c=chain) in err[0], err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


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


def test_check_ready_recipes(chain, capsys):
    for stage in ("sft", "rm", "dpo", "ppo"):
        args = cli_args(stage, chain["root"])
        assert main(["check", args[1], *args[2:]]) == 0
        out = capsys.readouterr().out
        assert out.strip().endswith("ready") and f"stage {stage}, valid" in out
        if stage == "sft":
            assert "[[" in out and "]]" in out  # trained tokens marked (not a TTY)
            assert "EOS ends the labels of" in out and "dropped as too long" in out
        if stage == "rm":
            assert "reward head reads the last non-pad token" in out


def test_check_reports_the_first_bad_record(chain, tmp_path, capsys):
    data = bad_file(tmp_path, GOOD + b"{broken\n")
    args = cli_args("sft", chain["root"], f"data.train={data}")
    assert main(["check", args[1], *args[2:]]) == 2
    assert capsys.readouterr().err.strip() == f"error: {data}:2: invalid JSON: Expecting property name enclosed " \
                                              f"in double quotes (column 2)"
    assert json.loads(GOOD)  # the good line itself is fine
