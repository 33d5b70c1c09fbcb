"""The on-disk cache of tokenized data (rlhf.datacache, rlhf.prepared): the same examples, counts and batch
lengths as the in-memory path on the task suite, in one process or several; reused when nothing changed,
prepared again when something did or when an entry cannot be trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_formats import tasks
from data_formats.schemas import parse_alpaca
from rlhf import prepared as prep
from rlhf.data import encode_sft, load_pairs, load_split, length_stats
from rlhf.errors import UserError
from rlhf.sections import PreferenceData, SFTData, TaskSuiteSection, TokenizerSection
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory):
    from stages.pretrain import train_tokenizer

    root = tmp_path_factory.mktemp("suite")
    suite = tasks.generate(TaskSuiteSection(sft_records=120, preference_records=90, prompt_records=10,
                                            eval_records=20, corpus_documents=200), seed=0)
    tok = train_tokenizer(suite["corpus"], TokenizerSection(vocab_size=400), 128)
    sft = suite["sft"] + [{"instruction": "no output"}]  # one invalid record, skipped and counted
    return {"tok": tok, "sft": write_jsonl(root / "sft.jsonl", sft),
            "prefs": write_jsonl(root / "prefs.jsonl", suite["prefs"])}


def sft_section(files, cache, **changes) -> SFTData:
    return SFTData(**{"train": str(files["sft"]), "eval_fraction": 0.2, "template": "plain", "max_len": 16,
                      "max_prompt_len": None, "skip_invalid": True, "cache_dir": str(cache), **changes})


def rows(dataset, names) -> list[dict]:
    return [{k: dataset[i][k] for k in names} for i in range(len(dataset))]


def old_sft(section, tok, seed=0):
    """Today's in-memory path, as the sft stage ran it before the cache."""
    split = load_split(section, parse_alpaca, seed, tokenizer=tok)
    enc = dict(max_len=section.max_len, train_on_prompt=section.train_on_prompt, max_prompt_len=section.max_prompt_len)
    train, tc = encode_sft(split.train, tok, **enc)
    evals, ec = encode_sft(split.eval, tok, **enc)
    counts = {**split.counts, **tc, "eval_dropped_too_long": ec["dropped_too_long"],
              "tokens": length_stats([len(e["input_ids"]) for e in train])}
    return train, evals, counts, split


@pytest.mark.parametrize("num_proc,max_prompt_len", [(1, None), (2, None), (2, 12)])
def test_sft_cache_equals_the_in_memory_path(suite_files, tmp_path, monkeypatch, num_proc, max_prompt_len):
    monkeypatch.setattr(prep, "CHUNK", 7)  # many chunks, so that workers share them out
    tok = suite_files["tok"]
    section = sft_section(suite_files, tmp_path, num_proc=num_proc, max_prompt_len=max_prompt_len)
    train, evals, counts, split = old_sft(section, tok)
    new = prep.prepare_sft(section, tok, seed=0)
    assert counts["truncated"] > 0 and counts["invalid_skipped"] == 1  # the limits do bite
    assert counts["dropped_too_long"] > 0 or max_prompt_len
    assert rows(new.train, ("input_ids", "labels")) == train
    assert rows(new.eval, ("input_ids", "labels")) == evals
    assert new.counts == json.loads(json.dumps(counts))
    assert new.lengths.tolist() == [len(e["input_ids"]) for e in train]  # what batch plans sort by
    assert [h["prompt"] for h in new.head] == [r.prompt for r in split.eval]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_pair_cache_equals_the_in_memory_path(suite_files, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(prep, "CHUNK", 11)
    tok = suite_files["tok"]
    section = PreferenceData(train=str(suite_files["prefs"]), eval_fraction=0.1, template="alpaca", max_len=48,
                             max_prompt_len=32, cache_dir=str(tmp_path), num_proc=num_proc)
    train, evals, counts = load_pairs(section, tok, 0)
    new = prep.prepare_pairs(section, tok, seed=0)
    names = ("prompt_ids", "chosen_ids", "rejected_ids", "margin")
    assert rows(new.train, names) == train and rows(new.eval, names) == evals
    assert new.counts == json.loads(json.dumps(counts))
    assert new.lengths.tolist() == [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
                                    for e in train]


def entry(tmp_path: Path) -> Path:
    [folder] = [p for p in tmp_path.iterdir() if p.name.startswith("sft-")]
    return folder


def test_a_second_run_reads_no_record_and_a_changed_key_prepares_again(suite_files, tmp_path, monkeypatch, capsys):
    tok = suite_files["tok"]
    first = prep.prepare_sft(sft_section(suite_files, tmp_path), tok, seed=0)
    assert "prepared" in capsys.readouterr().out

    def no_reading(*args, **kwargs):
        raise AssertionError("records were read again")

    monkeypatch.setattr(prep, "load_split", no_reading)
    again = prep.prepare_sft(sft_section(suite_files, tmp_path), tok, seed=0)
    assert "reused" in capsys.readouterr().out
    assert rows(again.train, ("input_ids",)) == rows(first.train, ("input_ids",)) and again.counts == first.counts
    with pytest.raises(AssertionError, match="read again"):  # another max_len is another entry
        prep.prepare_sft(sft_section(suite_files, tmp_path, max_len=17), tok, seed=0)
    with pytest.raises(AssertionError, match="read again"):  # another seed holds out other prompts
        prep.prepare_sft(sft_section(suite_files, tmp_path), tok, seed=1)


def test_a_changed_data_file_is_prepared_again(suite_files, tmp_path):
    tok = suite_files["tok"]
    data = tmp_path / "d.jsonl"
    data.write_bytes(suite_files["sft"].read_bytes())
    cache = tmp_path / "cache"
    before = prep.prepare_sft(sft_section(suite_files, cache, train=str(data)), tok, seed=0)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:60]) + "\n")
    after = prep.prepare_sft(sft_section(suite_files, cache, train=str(data)), tok, seed=0)
    assert after.counts["train_records"] < before.counts["train_records"]
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "meta"])
def test_an_entry_that_cannot_be_trusted_is_prepared_again(suite_files, tmp_path, capsys, damage):
    tok = suite_files["tok"]
    good = prep.prepare_sft(sft_section(suite_files, tmp_path), tok, seed=0)
    expected = rows(good.train, ("input_ids", "labels"))
    folder = entry(tmp_path)
    arrow, meta = folder / "train.arrow", folder / "meta.json"
    del good
    if damage == "flip":
        blob = bytearray(arrow.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        arrow.write_bytes(bytes(blob))
    elif damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:100])
    elif damage == "version":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 0}))
    else:
        meta.write_text("{")
    capsys.readouterr()
    again = prep.prepare_sft(sft_section(suite_files, tmp_path), tok, seed=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: data.cache_dir: cache entry") and "preparing" in err[0]
    if damage == "version":
        assert "another version of this code" in err[0]
    assert rows(again.train, ("input_ids", "labels")) == expected


def test_a_cache_folder_that_cannot_be_written_is_one_line(suite_files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError) as err:
        prep.prepare_sft(sft_section(suite_files, blocker / "cache"), suite_files["tok"], seed=0)
    assert err.value.key == "data.cache_dir" and "not writable" in str(err.value) and "\n" not in str(err.value)


def test_the_default_cache_folder(monkeypatch, tmp_path):
    from rlhf.datacache import cache_root

    monkeypatch.delenv("RLHF_DATA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root(None) == tmp_path / "rlhf" / "data"
    monkeypatch.setenv("RLHF_DATA_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env" and cache_root("/x") == Path("/x")


def packed_in_memory(docs: list[str], tokenizer, max_len: int) -> list[list[int]]:
    """The pretrain stage's rows before the cache: <s> doc </s> ... concatenated and cut, the tail dropped."""
    ids = tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]
    stream = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    return [stream[i:i + max_len] for i in range(0, len(stream) - max_len + 1, max_len)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_corpus_rows_equal_the_in_memory_packing(suite_files, tmp_path, monkeypatch, num_proc):
    from rlhf.corpus import prepare_corpus
    from rlhf.sections import CorpusData

    monkeypatch.setattr(prep, "CHUNK", 13)  # rows straddle chunks: the partial row is carried over
    tok = suite_files["tok"]
    docs = tasks.generate(TaskSuiteSection(sft_records=10, preference_records=10, prompt_records=10,
                                           eval_records=10, corpus_documents=150), seed=1)["corpus"]
    section = CorpusData(train=[str(suite_files["sft"])], max_len=32, cache_dir=str(tmp_path), num_proc=num_proc)
    train, evals, counts = prepare_corpus(section, tok, docs[10:], docs[:10], seed=0)
    assert [r["input_ids"] for r in train] == packed_in_memory(docs[10:], tok, 32)
    assert [r["input_ids"] for r in evals] == packed_in_memory(docs[:10], tok, 32)
    assert counts["train_rows"] == len(train) > 0


def test_prompt_rows_equal_the_in_memory_path(suite_files, tmp_path, monkeypatch):
    from data_formats.schemas import parse_prompt
    from rlhf.data import encode_prompts
    from rlhf.sections import PromptData

    monkeypatch.setattr(prep, "CHUNK", 9)
    tok = suite_files["tok"]
    suite = tasks.generate(TaskSuiteSection(sft_records=10, preference_records=10, prompt_records=40,
                                            eval_records=10, corpus_documents=10), seed=2)
    data = write_jsonl(tmp_path / "prompts.jsonl", suite["prompts"])
    section = PromptData(train=str(data), template="alpaca", max_prompt_len=12, cache_dir=str(tmp_path), num_proc=2)
    split = load_split(section, parse_prompt, 0, tokenizer=tok)
    old, counts = encode_prompts(split.train, tok, 12)
    rows, new_counts = prep.prepare_prompts(section, tok, 0)
    assert counts["truncated"] > 0 and new_counts == {**split.counts, **counts}
    assert list(rows) == old and rows[2:5] == old[2:5] and rows.metas() == [p["meta"] for p in old]
