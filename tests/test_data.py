"""Data formats: exact templates, masking, HH conversion, validation errors, the task suite."""

from __future__ import annotations

import json

import pytest

from data_formats import tasks
from data_formats.readers import Invalid, Raw, read_records
from data_formats.schemas import hh_split, parse_alpaca, parse_preference, parse_prompt
from data_formats.templates import load_template
from rlhf.data import (IGNORE_INDEX, collate_pairs, collate_sft, encode_preferences, encode_sft, load_split,
                       plan_batches)
from rlhf.errors import DataError, UserError
from rlhf.recipes import PreferenceData, SFTData, TaskSuiteSection
from tests.conftest import write_jsonl

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\nSay hi.\n\n### Response:\n")


class CharTokenizer:
    """A tiny stand-in tokenizer: one id per character, BOS=1, EOS=2, PAD=0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        ids = [[1] * add_special_tokens + [ord(c) + 3 for c in t] for t in texts]
        return {"input_ids": ids}


def test_alpaca_template_exact_strings():
    t = load_template("alpaca")
    assert t.render("Add.", "2 and 3") == ALPACA_INPUT
    assert t.render("Say hi.", "") == ALPACA_NO_INPUT
    assert t.render("Say hi.") == ALPACA_NO_INPUT


def test_template_from_file_and_unknown_name(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_input": "Q: {instruction} {input}\nA:",
                                "prompt_no_input": "Q: {instruction}\nA:"}))
    assert load_template(str(path)).render("x", "y") == "Q: x y\nA:"
    with pytest.raises(UserError, match="unknown template 'nope'"):
        load_template("nope")
    path.write_text(json.dumps({"prompt_input": "no placeholder", "prompt_no_input": "{instruction}"}))
    with pytest.raises(UserError, match="prompt_input has no {instruction} placeholder"):
        load_template(str(path))


def test_sft_masking_trains_only_response_and_eos():
    rec = parse_alpaca(Raw("f:1", {"instruction": "hi", "output": "yo"}), load_template("plain"))
    [ex], counts = encode_sft([rec], CharTokenizer(), max_len=64, train_on_prompt=False)
    prompt_len = 1 + len("hi\n")
    assert ex["input_ids"][-1] == 2  # EOS appended
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == [ord("y") + 3, ord("o") + 3, 2]
    [ex2], _ = encode_sft([rec], CharTokenizer(), max_len=64, train_on_prompt=True)
    assert ex2["labels"] == ex2["input_ids"]


def test_sft_truncation_keeps_the_response_or_drops():
    template = load_template("plain")
    long_prompt = parse_alpaca(Raw("f:1", {"instruction": "x" * 50, "output": "yo"}), template)
    short = parse_alpaca(Raw("f:2", {"instruction": "q", "output": "a" * 40}), template)
    examples, counts = encode_sft([long_prompt, short], CharTokenizer(), max_len=20, train_on_prompt=False)
    assert counts == {"dropped_too_long": 1, "truncated": 1}
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 20
    assert any(lab != IGNORE_INDEX for lab in examples[0]["labels"])
    with pytest.raises(UserError, match="all 1 records are too long for 20 tokens"):
        encode_sft([long_prompt], CharTokenizer(), max_len=20, train_on_prompt=False)


def test_packing_restarts_positions_and_masks_boundaries():
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}, {"input_ids": [1, 7, 2], "labels": [1, 7, 2]}]
    packed = collate_sft(rows, pad_id=0, packing=True)
    assert packed["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, -100, 6, 2, -100, 7, 2]]  # no prediction across the boundary
    assert packed["attention_mask"] is None
    padded = collate_sft(rows, pad_id=0, packing=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_hh_conversion_and_mismatch():
    raw = Raw("hh.jsonl:3", {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
                             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no"})
    rec = hh_split(raw)
    assert rec.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" see you", " no")
    assert parse_preference(raw, load_template("alpaca")).prompt == rec.prompt  # auto-detected
    bad = Raw("hh.jsonl:7", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    with pytest.raises(DataError) as err:
        hh_split(bad)
    assert err.value.line() == ("error: hh.jsonl:7: rejected: chosen and rejected transcripts differ before the last "
                                "Assistant turn")


def test_preference_from_alpaca_fields_margin_and_collation():
    template = load_template("plain")
    rec = parse_preference(Raw("p:1", {"instruction": "q", "input": "i", "chosen": "a", "rejected": "b",
                                       "margin": 2}), template)
    assert rec.prompt == "q\ni\n" and rec.margin == 2.0
    pairs, _ = encode_preferences([rec], CharTokenizer(), max_len=32, max_prompt_len=16)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 2  # chosen row, then rejected row
    assert batch["labels"][0].tolist()[-2:] == [ord("a") + 3, 2]
    assert batch["margin"].tolist() == [2.0]
    with pytest.raises(DataError, match="margin: expected a number, got str"):
        parse_preference(Raw("p:2", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "x"}), template)
    with pytest.raises(DataError, match="p:3: rejected: identical to chosen"):
        parse_preference(Raw("p:3", {"prompt": "q", "chosen": "a", "rejected": "a"}), template)


# --- files: every problem names file:line and the field ----------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "{f}:2: invalid JSON"),
    (b'{"instruction": "a"}\n', "{f}:1: output: missing"),
    (b'{"instruction": 3, "output": "b"}\n', "{f}:1: instruction: expected a string, got int"),
    (b'{"output": "b"}\n', "{f}:1: instruction: missing"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n',
     "{f}:2: not valid UTF-8"),
    (b'[1, 2]\n', "{f}:1: expected a JSON object"),
    (b"", "{f}: data.train: no valid records"),
])
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert err.value.line().startswith("error: " + message.format(f=path))


def test_json_list_files_report_the_record_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
    with pytest.raises(DataError, match=r"d.json:3: output: missing"):
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)


def test_skip_invalid_counts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\nnot json\n{"instruction": "c"}\n')
    split = load_split(SFTData(train=str(path), skip_invalid=True), parse_alpaca, seed=0)
    assert len(split.train) == 1 and split.counts["invalid_skipped"] == 2
    assert split.counts["first_invalid"].startswith(f"error: {path}:2: invalid JSON")


def test_missing_file_and_duplicate_prompts(tmp_path):
    with pytest.raises(UserError, match="data file runs/nope/x.jsonl not found"):
        load_split(SFTData(train="runs/nope/x.jsonl"), parse_alpaca, seed=0)
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(4)])
    evals = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q2", "output": "b"}])
    with pytest.raises(DataError, match=r"1 eval prompt\(s\) also appear in the training data .*e.jsonl:1"):
        load_split(SFTData(train=str(train), eval=str(evals)), parse_alpaca, seed=0)


def test_eval_fraction_splits_by_prompt(tmp_path):
    rows = [{"instruction": f"q{i % 10}", "chosen": "a", "rejected": f"b{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    split = load_split(PreferenceData(train=str(path), eval_fraction=0.3), parse_preference, seed=1)
    assert {r.prompt for r in split.train}.isdisjoint({r.prompt for r in split.eval})
    assert len(split.eval) == 12 and len(split.train) == 28


def test_prompt_records_keep_gold_fields(tmp_path):
    rec = parse_prompt(Raw("e:1", {"instruction": "Reverse the list.", "input": "a b", "answer": "b a",
                                   "task": "reverse"}), load_template("plain"))
    assert rec.prompt == "Reverse the list.\na b\n" and rec.meta["answer"] == "b a"


def test_plan_batches_cover_each_example_once_across_processes():
    seen = []
    for rank in range(2):
        for micro in plan_batches(n=37, batch_size=8, micro=2, rank=rank, world=2, seed=3, epoch=1, step=2):
            seen += micro
    assert len(seen) == 8 and len(set(seen)) == 8
    single = [i for m in plan_batches(37, 8, 4, 0, 1, 3, 1, 2) for i in m]
    assert sorted(single) == sorted(seen)  # same global batch whatever the process count


# --- the task suite --------------------------------------------------------------------------------------


def small_suite(**changes) -> TaskSuiteSection:
    return TaskSuiteSection(**{"sft_records": 60, "preference_records": 60, "prompt_records": 30,
                               "eval_records": 20, "corpus_documents": 50, **changes})


def test_task_suite_is_deterministic_and_disjoint():
    a, b = tasks.generate(small_suite(), seed=5), tasks.generate(small_suite(), seed=5)
    assert a == b
    assert tasks.generate(small_suite(), seed=6) != a
    key = lambda r: (r["task"], r["input"])  # noqa: E731
    held = {key(r) for split in ("eval_prompts", "sft_eval", "prefs_eval") for r in a[split]}
    train = {key(r) for split in ("sft", "prefs", "prompts") for r in a[split]}
    assert held.isdisjoint(train)
    corpus = "\n".join(a["corpus"])
    for r in a["eval_prompts"]:
        statement = tasks.FAMILIES[r["task"]].statements[0].format(x=r["input"], y=r["answer"])
        assert statement not in corpus


def test_gold_scorer_accepts_answers_and_rejects_corruptions():
    suite = tasks.generate(small_suite(families=list(tasks.FAMILIES)), seed=0)
    for row in suite["prefs"]:
        assert tasks.grade(row, row["chosen"])
        assert tasks.grade(row, "  " + row["chosen"] + " ")  # whitespace does not matter
        assert not tasks.grade(row, row["rejected"])
        assert not tasks.grade(row, row["chosen"] + "\nmore text")  # nothing may follow the answer
    assert tasks.grade({"task": "reverse", "input": "a b c"}, "c b a")  # answer derived from the input
    assert tasks.grade({"task": "sort", "input": "c a b"}, "a b c")
    assert tasks.grade({"task": "upper", "input": "c a"}, "C A")
    assert tasks.grade({"task": "max", "input": "c a h"}, "h")
    assert tasks.grade({"task": "count", "input": "c a h"}, "3")


def test_sft_noise_fraction():
    suite = tasks.generate(small_suite(sft_records=400, sft_noise=0.3), seed=0)
    wrong = sum(r["output"] != r["answer"] for r in suite["sft"]) / len(suite["sft"])
    assert 0.22 < wrong < 0.38
    assert all(r["output"] == r["answer"] for r in suite["sft_eval"])


def test_read_records_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
    write_jsonl(tmp_path / "b.jsonl", [{"x": 2}, {"x": 3}])
    rows = read_records(str(tmp_path), "train", Invalid(False), "data.train")
    assert [r.data["x"] for r in rows] == [1, 2, 3]
    assert rows[2].where.endswith("b.jsonl:2")


def test_parquet_files_are_read_with_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "q1", "output": "a"}, {"instruction": "q2", "output": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet:row 2: output: missing"):
        load_split(SFTData(train=str(tmp_path / "d.parquet")), parse_alpaca, seed=0)
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "ok.parquet")
    assert load_split(SFTData(train=str(tmp_path / "ok.parquet")), parse_alpaca, seed=0).train[0].response == "a"
