"""Data formats: exact templates, masking, HH conversion, validation errors, the task suite."""

from __future__ import annotations

import json

import pytest

from data_formats import tasks
from data_formats.chat import make_format
from data_formats.readers import Invalid, Raw, read_records
from data_formats.schemas import hh_split, parse_alpaca, parse_preference, parse_prompt
from data_formats.templates import load_template
from rlhf.data import IGNORE_INDEX, encode_preferences, encode_sft, load_split, read_corpus
from rlhf.batching import balanced_rows, collate_pairs, collate_sft, plan_batches
from rlhf.errors import DataError, UserError
from rlhf.sections import PreferenceData, PromptData, SFTData, TaskSuiteSection
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
    with pytest.raises(UserError, match="prompt_input: has no {instruction} placeholder"):
        load_template(str(path))


@pytest.mark.parametrize("content, message", [
    ('["{instruction}", "{input}"]', "{f}: expected a JSON object with prompt_input and prompt_no_input, got list"),
    ('{"prompt_input": "{instruction} {input}",\n "prompt_no_input": "{ctx}: {instruction}"}',
     "{f}: prompt_no_input: unknown placeholder {ctx}; allowed here: {instruction}"),
    ('{"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction} {input}"}',
     "{f}: prompt_no_input: unknown placeholder {input}; allowed here: {instruction} ({input} belongs in "
     "prompt_input only)"),
    ('{"prompt_input": "{instruction} {input} {ctx}", "prompt_no_input": "{instruction}"}',
     "{f}: prompt_input: unknown placeholder {ctx}; allowed here: {instruction}, {input}"),
    ('{"prompt_input": "{instruction}", "prompt_no_input": "{instruction}"}',
     "{f}: prompt_input: has no {input} placeholder"),
    ('{"prompt_input": "{instruction} {input} {", "prompt_no_input": "{instruction}"}',
     "{f}: prompt_input: Single '{' encountered in format string"),
    ('{"prompt_input": "{instruction.upper} {input}", "prompt_no_input": "{instruction}"}',
     "{f}: prompt_input: unknown placeholder {instruction.upper}"),
    ('{"prompt_input": "{0} {instruction} {input}", "prompt_no_input": "{instruction}"}',
     "{f}: prompt_input: unknown placeholder {0}"),
    ('{"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction!r}"}',
     "{f}: prompt_no_input: placeholder {instruction} takes no format spec or conversion"),
    ('{"prompt_input": "{instruction} {input}"}', "{f}: prompt_no_input: missing"),
    ('{"prompt_input": "{instruction} {input}", "prompt_no_input": 3}',
     "{f}: prompt_no_input: expected a string, got int"),
    ('{"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}", "response_split": 1}',
     "{f}: response_split: expected a string, got int"),
    ('{"prompt_input": \n', "{f}:2: invalid JSON"),
])
def test_bad_template_files_fail_at_load_with_file_and_field(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_template(str(path))
    assert err.value.line().startswith("error: " + message.replace("{f}", str(path))), err.value.line()


def test_template_literal_braces_are_allowed(tmp_path):
    path = tmp_path / "braces.json"
    path.write_text(json.dumps({"prompt_input": "{{json}} {instruction}\n{input}\n",
                                "prompt_no_input": "{instruction}\n"}))
    assert load_template(str(path)).render("q", "{x}") == "{json} q\n{x}\n"  # record text is never formatted


def test_sft_masking_trains_only_response_and_eos():
    rec = parse_alpaca(Raw("f:1", {"instruction": "hi", "output": "yo"}), make_format("plain"))
    [ex], counts = encode_sft([rec], CharTokenizer(), max_len=64, train_on_prompt=False)
    prompt_len = 1 + len("hi\n")
    assert ex["input_ids"][-1] == 2  # EOS appended
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == [ord("y") + 3, ord("o") + 3, 2]
    [ex2], _ = encode_sft([rec], CharTokenizer(), max_len=64, train_on_prompt=True)
    assert ex2["labels"] == ex2["input_ids"]


def test_sft_truncation_keeps_the_response_or_drops():
    template = make_format("plain")
    long_prompt = parse_alpaca(Raw("f:1", {"instruction": "x" * 50, "output": "yo"}), template)
    short = parse_alpaca(Raw("f:2", {"instruction": "q", "output": "a" * 40}), template)
    examples, counts = encode_sft([long_prompt, short], CharTokenizer(), max_len=20, train_on_prompt=False)
    assert counts == {"dropped_too_long": 1, "truncated": 1}
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 20
    assert any(lab != IGNORE_INDEX for lab in examples[0]["labels"])
    with pytest.raises(UserError, match="all 1 records are too long for 20 tokens"):
        encode_sft([long_prompt], CharTokenizer(), max_len=20, train_on_prompt=False)


def test_sft_max_prompt_len_cuts_the_prompt_from_the_left():
    template = make_format("plain")
    head, tail = "h" * 30, "t" * 10
    long_prompt = parse_alpaca(Raw("f:1", {"instruction": head + tail, "output": "yo"}), template)
    short = parse_alpaca(Raw("f:2", {"instruction": "q", "output": "a" * 40}), template)
    examples, counts = encode_sft([long_prompt, short], CharTokenizer(), max_len=20, train_on_prompt=False,
                                  max_prompt_len=12)
    assert counts == {"dropped_too_long": 0, "truncated": 2}  # without max_prompt_len the first is dropped
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    # BOS, then the last 11 prompt characters ("t" * 10 + "\n"): the end next to the response is kept
    assert ids[:12] == [1] + [ord(c) + 3 for c in tail + "\n"]
    assert ids[12:] == [ord("y") + 3, ord("o") + 3, 2]  # the whole response and EOS
    assert labels == [IGNORE_INDEX] * 12 + ids[12:]  # prompt tokens are not trained
    ids, labels = examples[1]["input_ids"], examples[1]["labels"]
    assert len(ids) == 20 and ids[:3] == [1, ord("q") + 3, ord("\n") + 3]  # short prompt untouched
    assert labels[:3] == [IGNORE_INDEX] * 3 and labels[3:] == [ord("a") + 3] * 17  # response tail cut, no EOS
    [whole], counts = encode_sft([long_prompt], CharTokenizer(), max_len=64, train_on_prompt=True, max_prompt_len=12)
    assert counts == {"dropped_too_long": 0, "truncated": 1} and whole["labels"] == whole["input_ids"]


def test_sft_prompt_filling_max_len_is_dropped_and_counted():
    template = make_format("plain")
    records = [parse_alpaca(Raw(f"f:{i}", {"instruction": "x" * n, "output": "yo"}), template)
               for i, n in enumerate((5, 40, 18, 19), start=1)]
    # prompt lengths with BOS and "\n": 7, 42, 20, 21 -> the last three leave no room in 20 tokens
    examples, counts = encode_sft(records, CharTokenizer(), max_len=20, train_on_prompt=False)
    assert counts == {"dropped_too_long": 3, "truncated": 0} and len(examples) == 1
    with pytest.raises(UserError, match="data.max_len: all 3 records are too long for 20 tokens after truncation "
                                        r"\(the prompt alone fills the budget\); raise it, set data.max_prompt_len"):
        encode_sft(records[1:], CharTokenizer(), max_len=20, train_on_prompt=False)


def test_packing_restarts_positions_and_masks_boundaries():
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}, {"input_ids": [1, 7, 2], "labels": [1, 7, 2]}]
    packed = collate_sft(rows, pad_id=0, packing=True)
    assert packed["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, -100, 6, 2, -100, 7, 2]]  # no prediction across the boundary
    assert packed["attention_mask"] is None
    padded = collate_sft(rows, pad_id=0, packing=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_packed_sft_rows_are_balanced_at_about_twice_the_longest_example():
    assert balanced_rows([5, 4, 3, 3, 2, 1]) == [[0, 3, 5], [1, 2, 4]]  # 18 tokens: 2 rows of 9, longest first
    assert balanced_rows([4, 3]) == [[0, 1]]
    rows = [{"input_ids": [1] + [5] * (n - 1), "labels": [-100] + [5] * (n - 1)} for n in (5, 4, 3, 3, 2, 1)]
    packed = collate_sft(rows, pad_id=0, packing=True)
    assert packed["input_ids"].shape == (2, 9) and (packed["input_ids"] == 0).sum() == 0  # no padding here
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert int((packed["labels"] != -100).sum()) == sum(n - 1 for n in (5, 4, 3, 3, 2, 1))


def test_packed_pairs_fill_rows_first_fit_decreasing():
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [6, 7, 8, 2], "rejected_ids": [9, 2], "margin": 0.0},
             {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 3, 2], "margin": 1.0}]
    batch = collate_pairs(pairs, pad_id=0, packing=True)
    # sequences 0..3 = chosen 0, chosen 1, rejected 0, rejected 1 of lengths 6, 2, 4, 4: rows of width 6, and
    # the short chosen 1 fills the row of rejected 0 (three rows where padding takes four)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 5, 9, 2, 1, 2], [1, 3, 3, 2, 0, 0]]
    assert batch["segments"].tolist() == [[0] * 6, [2, 2, 2, 2, 1, 1], [3, 3, 3, 3, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 8, 2], [-100, -100, 9, 2, -100, 2],
                                        [-100, 3, 3, 2, -100, -100]]
    assert batch["attention_mask"] is None and batch["margin"].tolist() == [0.0, 1.0]
    flat = batch["input_ids"].flatten()
    assert flat[batch["last"]].tolist() == [2, 2, 2, 2]  # each sequence's last token (EOS here)
    assert batch["last"].tolist() == [5, 11, 9, 15]


def test_hh_conversion_and_mismatch():
    raw = Raw("hh.jsonl:3", {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
                             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no"})
    rec = hh_split(raw)
    assert rec.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" see you", " no")
    assert parse_preference(raw, make_format("alpaca")).prompt == rec.prompt  # auto-detected
    bad = Raw("hh.jsonl:7", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    with pytest.raises(DataError) as err:
        hh_split(bad)
    assert err.value.line() == ("error: hh.jsonl:7: rejected: chosen and rejected transcripts differ before the last "
                                "Assistant turn")


def test_preference_from_alpaca_fields_margin_and_collation():
    template = make_format("plain")
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


def test_json_files_holding_json_lines_are_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"  # e.g. pandas `to_json(lines=True)` or a Hub export
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    split = load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert [r.response for r in split.train] == ["b", "d"] and split.train[1].where == f"{path}:3"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert err.value.line() == f"error: {path}:2: output: missing"  # line numbers as for .jsonl
    path.write_bytes(b'\xef\xbb\xbf  [{"instruction": "a", "output": "b"}]')  # a list, after a BOM
    assert load_split(SFTData(train=str(path)), parse_alpaca, seed=0).train[0].response == "b"


def test_json_list_with_a_non_object_element(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  "just text",\n'
                    '  {"instruction": "c", "output": "d"}\n]')
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert err.value.line() == f"error: {path}:3: expected a JSON object, got str"
    split = load_split(SFTData(train=str(path), skip_invalid=True), parse_alpaca, seed=0)
    assert len(split.train) == 2 and split.counts["invalid_skipped"] == 1


def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert err.value.line().startswith(f"error: {path}: cannot read as parquet: ")
    assert "\n" not in err.value.line()


@pytest.mark.parametrize("row, message", [
    ({"instruction": "a", "output": ""}, "output: is empty"),
    ({"instruction": "a", "output": "  \n"}, "output: is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "chosen: response is empty"),
    ({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"}, "chosen: has no '\\n\\nAssistant:' turn"),
])
def test_empty_responses_and_hh_without_assistant_turn(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(path)), parse_alpaca, seed=0)
    assert err.value.line() == f"error: {path}:1: {message}"


def test_hh_pairs_without_assistant_turn_name_the_transcript(tmp_path):
    bad = {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [bad])
    for fmt in ("auto", "hh"):
        with pytest.raises(DataError) as err:
            load_split(PreferenceData(train=str(path), format=fmt), lambda r, t: parse_preference(r, t, fmt), seed=0)  # noqa: B023 (called in this iteration)
        assert err.value.line() == f"error: {path}:1: chosen: has no '\\n\\nAssistant:' turn"
    with pytest.raises(DataError, match=r"hh.jsonl:1: chosen: has no"):
        load_split(PromptData(train=str(path)), parse_prompt, seed=0)


def test_empty_folder_as_data_path(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not data")
    with pytest.raises(UserError) as err:
        load_split(SFTData(train=str(tmp_path / "data")), parse_alpaca, seed=0)
    assert err.value.line() == f"error: data.train: folder {tmp_path / 'data'} holds no .jsonl/.json/.parquet files"


def test_eval_split_problems(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(4)])
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(train), eval=str(empty)), parse_alpaca, seed=0)
    assert err.value.line() == f"error: {empty}: data.eval: no valid records"
    bad = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "z"}])
    with pytest.raises(DataError) as err:
        load_split(SFTData(train=str(train), eval=str(bad), skip_invalid=True), parse_alpaca, seed=0)
    assert err.value.line() == (f"error: {bad}: data.eval: no valid records (first problem: error: {bad}:1: "
                                "output: missing)")
    with pytest.raises(UserError) as err:
        load_split(SFTData(train=str(train), eval=str(train)), parse_alpaca, seed=0)
    assert err.value.line() == ("error: data.eval: is the same data as data.train; give another file or set "
                                "data.eval_split")
    same = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "q", "output": f"a{i}"} for i in range(5)])
    with pytest.raises(UserError) as err:
        load_split(SFTData(train=str(same), eval_fraction=0.2), parse_alpaca, seed=0)
    assert err.value.line().startswith("error: data.eval_fraction: leaves no training records: the data holds 1 "
                                       "distinct prompt(s)")


def test_eval_split_errors_name_the_given_keys(tmp_path):
    with pytest.raises(UserError) as err:
        load_split(PromptData(train=str(tmp_path / "gold.jsonl")), parse_prompt, seed=0,
                   keys={"train": "ppo.gold_prompts"})
    assert err.value.line() == f"error: ppo.gold_prompts: data file {tmp_path / 'gold.jsonl'} not found"


def test_preference_data_all_too_long():
    template = make_format("plain")
    recs = [parse_preference(Raw(f"p:{i}", {"prompt": "q" * 30, "chosen": "same start x", "rejected": "same start y"}),
                             template) for i in range(3)]
    with pytest.raises(UserError) as err:  # prompt cut to 8 tokens, 4 left: "same" vs "same"
        encode_preferences(recs, CharTokenizer(), max_len=12, max_prompt_len=8)
    assert err.value.line().startswith("error: data.max_len: all 3 records are too long for 12 tokens after "
                                       "truncation (no response token, or none that tells chosen from rejected")
    pairs, counts = encode_preferences(recs, CharTokenizer(), max_len=30, max_prompt_len=8)
    assert len(pairs) == 3 and counts == {"dropped_too_long": 0, "truncated": 3}


def test_prompt_only_records_are_prompt_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi.\n", "id": 7}, {"prompt": "Say bye.\n"}])
    split = load_split(PromptData(train=str(path)), parse_prompt, seed=0)
    assert [r.prompt for r in split.train] == ["Say hi.\n", "Say bye.\n"]  # verbatim, no template
    assert split.train[0].meta == {"id": 7}
    with pytest.raises(DataError, match=r"p.jsonl:1: prompt: is empty"):
        load_split(PromptData(train=str(write_jsonl(path, [{"prompt": " "}]))), parse_prompt, seed=0)


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
                                   "task": "reverse"}), make_format("plain"))
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


@pytest.mark.parametrize("alphabet", ["a", "aaa", "abC", "ab1"])
def test_task_suite_refuses_alphabets_it_cannot_corrupt(alphabet):
    with pytest.raises(ValueError, match="alphabet: expected"):
        tasks.generate(small_suite(alphabet=alphabet), seed=0)


def test_two_letter_alphabet_still_gives_wrong_answers():
    suite = tasks.generate(small_suite(alphabet="ab", families=list(tasks.FAMILIES), min_items=2, max_items=6,
                                       preference_records=40, sft_records=20, prompt_records=10, eval_records=10),
                           seed=0)
    for row in suite["prefs"]:
        assert not tasks.grade(row, row["rejected"])


def test_read_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="data.train: corpus file .*none.txt not found"):
        read_corpus([str(tmp_path / "none.txt")])
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n[1]\n')
    with pytest.raises(DataError) as err:
        read_corpus([str(tmp_path / "c.jsonl")])
    assert err.value.line() == f"error: {tmp_path / 'c.jsonl'}:2: expected a JSON object with a 'text' field"
    (tmp_path / "c.txt").write_text("one\n\n\ntwo\n")
    assert read_corpus([str(tmp_path / "c.txt")]) == ["one", "two"]


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
