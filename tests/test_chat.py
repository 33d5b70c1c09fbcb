"""Conversational records and chat templates, on tokenizers built by hand (no hub, `tests.families`):

- `llama3`: a Llama-3-style template that writes BOS, ends turns with <|eot_id|>, and a reserved
  <|finetune_right_pad_id|>; no pad token; the Llama 3 pre-tokenizer regex.
- `chatml`: ChatML (<|im_start|>, <|im_end|> = EOS), pad <|endoftext|> (Qwen2.5-Instruct-like).
- `base`: no template (a base model; `model.chat_template: chatml` installs the shipped one).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from data_formats import tasks
from data_formats.chat import install_chat_template, install_template, jinja_literal, make_format
from data_formats.readers import Raw
from data_formats.schemas import parse_alpaca, parse_preference, parse_prompt
from data_formats.templates import available, load_template
from rlhf.data import IGNORE_INDEX, encode_preferences, encode_prompts, encode_sft, load_split, prompt_ids
from rlhf.errors import DataError, UserError
from rlhf.tokenization import load_tokenizer, stop_token_ids
from rlhf.sections import PreferenceData, PromptData, SFTData, TaskSuiteSection, TokenizerSection
from tests.conftest import write_jsonl
from tests.families import CHATML_TEMPLATE, base, chatml, llama3


def model_folder(tokenizer, path: Path, generation: dict | None = None) -> Path:
    """A folder `load_tokenizer` accepts: the tokenizer, a tiny config, optionally a generation config."""
    tokenizer.save_pretrained(path)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(path)
    if generation:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATION = [SYSTEM, user("Reverse the list.\n\nc a f b"), assistant("b f a c"), user("Thanks!"),
                assistant("Hello there.")]
END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
TOKENIZERS = {"llama3": llama3, "chatml": chatml}


def trained_spans(tokenizer, example: dict) -> list[str]:
    """The decoded runs of trained tokens of an encoded SFT example."""
    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans, run = spans + [tokenizer.decode(run)], []
    return spans + ([tokenizer.decode(run)] if run else [])


# --- records --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [
    {"messages": [user("Say hi."), assistant("Hello there.")]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hello there."}]},
    {"prompt": [user("Say hi.")], "completion": [assistant("Hello there.")]},
    {"instruction": "Say hi.", "output": "Hello there."},
    {"prompt": "Say hi.", "output": "Hello there."},
])
def test_every_sft_form_is_one_user_turn_and_its_reply(record):
    tok = chatml()
    rec = parse_alpaca(Raw("f:1", record), make_format("chat", tok))
    assert rec.prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert (rec.response, rec.rest, rec.eos, rec.special_tokens) == ("Hello there.<|im_end|>", [], False, False)


def test_sharegpt_system_turn_and_alpaca_input_under_chat():
    fmt = make_format("chat", chatml())
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    rec = parse_alpaca(Raw("f:1", {"conversations": turns}), fmt)
    assert rec.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    rec = parse_alpaca(Raw("f:2", {"instruction": "Reverse the list.", "input": "c a f b", "output": "b f a c"}), fmt)
    assert rec.prompt == "<|im_start|>user\nReverse the list.\n\nc a f b<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_completion_trains_the_completion_only():
    tok = chatml()
    record = {"prompt": [user("Reverse the list.\n\nc a f b"), assistant("b f a c"), user("Thanks!")],
              "completion": [assistant("Hello there.")]}
    [ex], _ = encode_sft([parse_alpaca(Raw("f:1", record), make_format("chat", tok))], tok, 200, False)
    assert trained_spans(tok, ex) == ["Hello there.<|im_end|>"]


@pytest.mark.parametrize("record", [
    {"chosen": [user("Say hi."), assistant("Hello there.")], "rejected": [user("Say hi."), assistant("Bye.")]},
    {"prompt": [user("Say hi.")], "chosen": [assistant("Hello there.")], "rejected": [assistant("Bye.")]},
    {"prompt": [user("Say hi.")], "chosen": [user("Say hi."), assistant("Hello there.")],
     "rejected": [user("Say hi."), assistant("Bye.")]},  # the prompt repeated in the completions
    {"prompt": "Say hi.", "chosen": [assistant("Hello there.")], "rejected": [assistant("Bye.")]},
    {"prompt": "Say hi.", "chosen": "Hello there.", "rejected": "Bye.", "margin": 1},
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Say hi.\n\nAssistant: Bye."},
])
def test_every_preference_form_under_chat(record):
    rec = parse_preference(Raw("f:1", record), make_format("chat", chatml()))
    assert rec.prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert (rec.chosen, rec.rejected) == ("Hello there.<|im_end|>", "Bye.<|im_end|>")
    assert rec.margin == (1.0 if "margin" in record else None)


def test_ultrafeedback_pair_keeps_the_shared_turns_as_prompt():
    chosen = CONVERSATION[:4] + [assistant("Hello there.")]
    rejected = CONVERSATION[:4] + [assistant("Bye.")]
    rec = parse_preference(Raw("f:1", {"prompt": "ignored: the turns carry it", "chosen": chosen,
                                       "rejected": rejected}), make_format("chat", chatml()))
    assert rec.prompt == chatml().apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)


def test_hh_transcripts_become_messages_under_chat_and_stay_verbatim_otherwise():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no"}
    tok = chatml()
    rec = parse_preference(Raw("hh:1", row), make_format("chat", tok))
    assert rec.prompt == tok.apply_chat_template([user("hi"), assistant("hello"), user("bye")], tokenize=False,
                                                 add_generation_prompt=True)
    assert (rec.chosen, rec.rejected) == ("see you<|im_end|>", "no<|im_end|>")
    assert parse_alpaca(Raw("hh:1", row), make_format("chat", tok)).response == "see you<|im_end|>"
    assert parse_prompt(Raw("hh:1", row), make_format("chat", tok)).prompt == rec.prompt
    text = parse_preference(Raw("hh:1", row), make_format("alpaca"))
    assert (text.prompt, text.chosen) == (row["chosen"][:-len(" see you")], " see you")


def test_prompt_records_render_the_generation_prompt_and_keep_gold_fields():
    fmt = make_format("chat", chatml())
    expected = "<|im_start|>user\nReverse the list.\n\nc a f b<|im_end|>\n<|im_start|>assistant\n"
    for record in ({"messages": [user("Reverse the list.\n\nc a f b")], "task": "reverse", "answer": "b f a c"},
                   {"prompt": [user("Reverse the list.\n\nc a f b")], "task": "reverse", "answer": "b f a c"},
                   # an SFT conversation used as prompts: the model writes the last reply
                   {"messages": [user("Reverse the list.\n\nc a f b"), assistant("b f a c")], "task": "reverse",
                    "answer": "b f a c"}):
        rec = parse_prompt(Raw("p:1", record), fmt)
        assert rec.prompt == expected and rec.meta == {"task": "reverse", "answer": "b f a c"}


def test_single_turn_messages_work_with_a_text_template():
    fmt = make_format("plain")
    rec = parse_alpaca(Raw("f:1", {"messages": [user("Reverse the list.\nc a f b"), assistant("b f a c")]}), fmt)
    assert (rec.prompt, rec.response, rec.eos, rec.special_tokens) == ("Reverse the list.\nc a f b\n", "b f a c",
                                                                       True, True)
    rec = parse_preference(Raw("f:2", {"chosen": [user("Sort."), assistant("a b")],
                                       "rejected": [user("Sort."), assistant("b a")]}), make_format("alpaca"))
    assert rec.prompt == load_template("alpaca").render("Sort.") and rec.chosen == "a b"
    assert parse_prompt(Raw("f:3", {"messages": [user("Sort.")]}), fmt).prompt == "Sort.\n"


# --- masks and token ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_multi_turn_trains_every_assistant_turn_and_nothing_else(name):
    tok = TOKENIZERS[name]()
    rec = parse_alpaca(Raw("f:1", {"messages": CONVERSATION}), make_format("chat", tok))
    [ex], counts = encode_sft([rec], tok, 256, train_on_prompt=False)
    assert trained_spans(tok, ex) == [f"b f a c{END[name]}", f"Hello there.{END[name]}"]
    assert ex["labels"][-1] == tok.convert_tokens_to_ids(END[name])  # the end of turn ends the labels, no EOS after
    [everything], _ = encode_sft([rec], tok, 256, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] == ex["input_ids"]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_turn_by_turn_ids_equal_the_whole_rendering(name):
    """The ids trained on are the tokenization of the rendered conversation (up to the last end of turn), and
    the prompt ids are exactly what the model is given when it generates."""
    tok = TOKENIZERS[name]()
    fmt = make_format("chat", tok)
    [ex], _ = encode_sft([parse_alpaca(Raw("f:1", {"messages": CONVERSATION}), fmt)], tok, 256, False)
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex["input_ids"] == tok(whole[:whole.rindex(END[name]) + len(END[name])], add_special_tokens=False)[
        "input_ids"]
    pair = {"chosen": CONVERSATION, "rejected": CONVERSATION[:4] + [assistant("Bye.")]}
    [p], _ = encode_preferences([parse_preference(Raw("f:2", pair), fmt)], tok, 256, 200)
    generation = tok.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)["input_ids"]
    assert p["prompt_ids"] == generation  # transformers tokenizes chat text without special tokens too
    assert p["prompt_ids"] + p["chosen_ids"] == tok(whole.rstrip(), add_special_tokens=False)["input_ids"]
    [q], _ = encode_prompts([parse_prompt(Raw("f:3", {"messages": CONVERSATION[:4]}), fmt)], tok, 200)
    assert q["prompt_ids"] == generation


def test_no_second_bos_when_the_template_writes_one():
    tok = llama3()
    bos = tok.bos_token_id
    fmt = make_format("chat", tok)
    sft = parse_alpaca(Raw("f:1", {"messages": CONVERSATION}), fmt)
    pair = parse_preference(Raw("f:2", {"chosen": CONVERSATION, "rejected": CONVERSATION[:4] + [assistant("No.")]}),
                            fmt)
    prompt = parse_prompt(Raw("f:3", {"messages": CONVERSATION[:2]}), fmt)
    [ex], _ = encode_sft([sft], tok, 256, False)
    [p], _ = encode_preferences([pair], tok, 256, 200)
    [q], _ = encode_prompts([prompt], tok, 200)
    for ids in (ex["input_ids"], p["prompt_ids"] + p["chosen_ids"], q["prompt_ids"], prompt_ids([sft], tok)[0]):
        assert ids[0] == bos and ids.count(bos) == 1
    # a text template still gets BOS from the tokenizer, once
    [text], _ = encode_sft([parse_alpaca(Raw("f:4", {"instruction": "Say hi.", "output": "Hi"}),
                                         make_format("plain"))], tok, 64, False)
    assert text["input_ids"][0] == bos and text["input_ids"].count(bos) == 1


def test_a_template_without_end_of_turn_gets_eos_after_each_reply():
    tok = chatml()
    tok.chat_template = ("{%- for m in messages -%}{{- m['role'] + ': ' + m['content'] + '\n' -}}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}")
    fmt = make_format("chat", tok)
    assert fmt.end is None and fmt.eos
    [ex], _ = encode_sft([parse_alpaca(Raw("f:1", {"messages": CONVERSATION}), fmt)], tok, 256, False)
    assert trained_spans(tok, ex) == ["b f a c<|im_end|>", "Hello there.<|im_end|>"]  # EOS is <|im_end|> here


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = chatml()  # drops earlier assistant turns, as reasoning templates drop earlier thinking
    tok.chat_template = ("{%- for m in messages -%}{%- if m['role'] != 'assistant' or loop.last -%}{{- m['role'] + "
                         "': ' + m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}")
    with pytest.raises(DataError) as err:
        parse_alpaca(Raw("f:4", {"messages": CONVERSATION}), make_format("chat", tok))
    assert err.value.line().startswith("error: f:4: data.template: the chat template of")
    assert "is not prefix-stable" in err.value.line()


# --- bad records: one line naming file:line and the field ---------------------------------------------------


@pytest.mark.parametrize("record, template, message", [
    ({"messages": [user("a"), {"role": "bot", "content": "b"}]}, "chat",
     "messages[1].role: unknown role 'bot' (expected assistant, system, user)"),
    ({"messages": [user("a"), {"role": "assistant", "content": ["b"]}]}, "chat",
     "messages[1].content: expected a string, got list"),
    ({"messages": [user("a"), {"role": "assistant"}]}, "chat", "messages[1].content: missing"),
    ({"messages": [user("a"), assistant("  ")]}, "chat", "messages[1].content: is empty"),
    ({"messages": []}, "chat", "messages: is empty (no messages)"),
    ({"messages": "hi"}, "chat", "messages: expected a list of messages, got str"),
    ({"messages": [user("a"), "b"]}, "chat", "messages[1]: expected an object with 'role' and 'content', got str"),
    ({"messages": [SYSTEM, user("a")]}, "chat", "messages: has no assistant turn: nothing to train"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]}, "chat",
     "conversations[1].from: unknown role 'bing'"),
    ({"prompt": [user("a")], "completion": [user("b")]}, "chat", "completion: has no assistant turn"),
    ({"prompt": [user("a")]}, "chat", "completion: missing"),
    ({"messages": CONVERSATION}, "alpaca",
     "data.template: a system turn needs 'chat' ('alpaca' is a text template with no place for one)"),
    ({"messages": CONVERSATION[1:]}, "plain",
     "data.template: a conversation of 4 turns needs 'chat' (the text template 'plain' renders a user turn and its "
     "reply)"),
])
def test_bad_sft_records(tmp_path, record, template, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("ok"), assistant("fine")]}, record])
    with pytest.raises(UserError) as err:
        load_split(SFTData(train=str(path), template=template), parse_alpaca, 0, tokenizer=chatml())
    assert err.value.line().startswith(f"error: {path}:2: {message}"), err.value.line()
    split = load_split(SFTData(train=str(path), template=template, skip_invalid=True), parse_alpaca, 0,
                       tokenizer=chatml())
    assert split.counts["invalid_skipped"] == 1 and len(split.train) == 1


@pytest.mark.parametrize("record, message", [
    ({"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
     "rejected: chosen and rejected differ before their last turn"),
    ({"chosen": [user("a"), assistant("x")], "rejected": [user("a"), user("y")]},
     "rejected[1].role: the last turn is the user's, not the assistant's"),
    ({"chosen": [assistant("x")], "rejected": [assistant("y")]}, "chosen: has no turn before the reply"),
    ({"prompt": [user("a")], "chosen": [assistant("x"), assistant("z")], "rejected": [assistant("y")]},
     "chosen: expected the one assistant turn that answers the prompt, got 2 turns"),
    ({"chosen": [user("a"), assistant("x")], "rejected": [user("a"), assistant("x")]},
     "rejected: identical to chosen"),
    ({"chosen": [user("a"), {"role": "assistant", "content": 1}], "rejected": [user("a"), assistant("y")]},
     "chosen[1].content: expected a string, got int"),
])
def test_bad_preference_records(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError) as err:
        load_split(PreferenceData(train=str(path), template="chat"), parse_preference, 0, tokenizer=chatml())
    assert err.value.line().startswith(f"error: {path}:1: {message}"), err.value.line()


def test_bad_prompt_records(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [user("a"), assistant("b")]}])
    with pytest.raises(DataError) as err:
        load_split(PromptData(train=str(path), template="chat"), parse_prompt, 0, tokenizer=chatml())
    assert err.value.line() == (f"error: {path}:1: prompt: the last turn is the assistant's; a prompt ends with a "
                                f"user turn")


def test_chat_without_a_template_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        make_format("chat", base())
    assert err.value.line().startswith("error: data.template: the tokenizer of")
    assert "has no chat template; install one with model.chat_template (e.g. chatml)" in err.value.line()
    with pytest.raises(UserError) as err:
        load_tokenizer(str(model_folder(base(), tmp_path / "m")), chat_template="nope")
    assert err.value.line() == "error: model.chat_template: unknown chat template 'nope' (shipped: chatml, or a " \
                               ".jinja file)"


# --- pad and stop tokens ---------------------------------------------------------------------------------------


def test_pad_prefers_a_spare_special_token_and_says_which(tmp_path, capsys):
    tok = load_tokenizer(str(model_folder(llama3(), tmp_path / "llama3")))
    assert tok.pad_token == "<|finetune_right_pad_id|>" and len(tok) == len(llama3())  # no embedding row added
    assert "pad token: '<|finetune_right_pad_id|>' (id 3), an existing special token" in capsys.readouterr().out
    padded_with_eos = chatml()
    padded_with_eos.pad_token = padded_with_eos.eos_token  # SmolLM2-Instruct pads with its <|im_end|>
    tok = load_tokenizer(str(model_folder(padded_with_eos, tmp_path / "chatml")))
    assert tok.pad_token == "<|endoftext|>" and len(tok) == len(chatml())
    assert "the tokenizer padded with its EOS token '<|im_end|>'" in capsys.readouterr().out
    tok = load_tokenizer(str(model_folder(base(), tmp_path / "base")))
    assert tok.pad_token == "<|pad|>" and len(tok) == len(base()) + 1  # nothing spare: one is added
    assert "pad token: '<|pad|>' added" in capsys.readouterr().out
    tok = load_tokenizer(str(tmp_path / "llama3"), pad_token="<my_pad>")  # the recipe's choice still wins
    assert tok.pad_token == "<my_pad>"
    kept = load_tokenizer(str(model_folder(chatml(), tmp_path / "qwen")))
    assert kept.pad_token == "<|endoftext|>" and capsys.readouterr().out == ""  # a dedicated pad is kept, silently


def test_pad_equal_to_eos_with_nothing_spare_is_an_error(tmp_path):
    tok = base()
    tok.pad_token = tok.eos_token
    with pytest.raises(UserError) as err:
        load_tokenizer(str(model_folder(tok, tmp_path / "m")))
    assert err.value.line().startswith("error: model.pad_token: the tokenizer of")
    assert "pads with its EOS token '</s>' and has no spare special token to pad with" in err.value.line()


def test_stop_token_ids(tmp_path):
    tok = llama3()  # <|end_of_text|> = 1, <|eot_id|> = 6, as Llama 3's generation config lists them
    folder = model_folder(tok, tmp_path / "llama3", {"eos_token_id": [1, 6, 2]})
    assert stop_token_ids(tok, folder) == [1, 6, 2]
    assert stop_token_ids(tok) == [1, 6]  # EOS and the template's end of turn
    assert stop_token_ids(tok, {"eos_token_id": 2}) == [1, 2, 6]
    assert stop_token_ids(chatml()) == [chatml().convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids(base()) == [base().eos_token_id]


def test_chatml_is_installed_into_a_base_tokenizer(tmp_path, capsys):
    tok = load_tokenizer(str(model_folder(base(), tmp_path / "base")), chat_template="chatml")
    out = capsys.readouterr().out
    assert "chat template: chatml, special tokens added: <|im_start|> <|im_end|>" in out
    assert tok.pad_token == "<|pad|>"  # the template's tokens are not spare
    assert tok.apply_chat_template([user("hi")], tokenize=False, add_generation_prompt=True) == \
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # BOS, as the base model's documents began
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    fmt = make_format("chat", tok)
    [ex], _ = encode_sft([parse_alpaca(Raw("f:1", {"messages": CONVERSATION}), fmt)], tok, 256, False)
    assert trained_spans(tok, ex) == ["b f a c<|im_end|>", "Hello there.<|im_end|>"]
    own = tmp_path / "mine.jinja"
    own.write_text("{{- bos_token + messages[0]['content'] -}}")  # writes BOS itself: nothing is put before it
    install_template(tok, str(own))
    assert tok.apply_chat_template([user("hi")], tokenize=False) == "<s>hi"


# --- text templates as chat templates -----------------------------------------------------------------------


@pytest.mark.parametrize("name", available())
def test_text_template_jinja_round_trip(tmp_path, name):
    """A model trained with a text template saves a chat template that renders exactly that template's prompt
    (with the BOS the tokenizer adds), reply + EOS, and refuses what the template cannot say."""
    tok = base()
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.chat_template = CHATML_TEMPLATE  # a stale template inherited from the base model
    install_chat_template(tok, name)
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    template, question = load_template(name), "Reverse the list.\nc a f b"
    assert saved.apply_chat_template([user(question)], tokenize=False, add_generation_prompt=True) == \
        "<s>" + template.render(question)
    assert saved.apply_chat_template([user(question)], add_generation_prompt=True)["input_ids"] == \
        tok(template.render(question))["input_ids"]  # the ids the text template trained on
    assert saved.apply_chat_template([user(question), assistant("b f a c")], tokenize=False) == \
        "<s>" + template.render(question) + "b f a c</s>"
    for refused in ([SYSTEM, user(question)], [user(question), assistant("x"), user("y")]):
        with pytest.raises(Exception, match=f"single-turn text template '{name}'"):
            saved.apply_chat_template(refused, tokenize=False)
    # `data.template: chat` on the saved tokenizer trains the very same ids as the text template did
    record = {"instruction": question, "output": "b f a c"}
    by_text = encode_sft([parse_alpaca(Raw("f:1", record), make_format(name))], saved, 256, False)[0]
    by_chat = encode_sft([parse_alpaca(Raw("f:1", {"messages": [user(question), assistant("b f a c")]}),
                                       make_format("chat", saved))], saved, 256, False)[0]
    assert by_chat == by_text


def test_text_template_literals_survive_jinja(tmp_path):
    tricky = 'say "{{ x }}" {% raw %} \\n\\\\ é 😀\t\r\n'
    path = tmp_path / "tricky.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": tricky.replace(
        "{", "{{").replace("}", "}}") + "{instruction}\n"}))
    tok = base()
    install_chat_template(tok, str(path))
    assert tok.apply_chat_template([user("q")], tokenize=False) == "<s>" + tricky + "q\n"
    from jinja2 import Environment

    assert Environment().from_string("{{ " + jinja_literal(tricky) + " }}").render() == tricky


def test_install_keeps_a_chat_format_and_replaces_a_stale_one(capsys):
    tok = chatml()
    install_chat_template(tok, "chat")
    assert tok.chat_template == CHATML_TEMPLATE
    install_chat_template(tok, "plain")
    assert tok.apply_chat_template([user("q")], tokenize=False) == "q\n"  # no BOS: this tokenizer adds none
    assert "renders the text template 'plain' it was trained with (replacing" in capsys.readouterr().out


# --- the shipped demo stays the same; the task suite as conversations -----------------------------------------


def old_encode(prompt: str, response: str | None, tokenizer) -> tuple[list[int], list[int]]:
    """The encoding of before conversations: prompt with the tokenizer's special tokens, response + EOS."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] if response else []
    return p, r


def small_suite(**changes) -> TaskSuiteSection:
    return TaskSuiteSection(**{"sft_records": 60, "preference_records": 60, "prompt_records": 30,
                               "eval_records": 20, "corpus_documents": 200, **changes})


@pytest.mark.parametrize("template", ["plain", "alpaca"])
def test_alpaca_records_encode_as_before(tmp_path, template):
    from stages.pretrain import train_tokenizer

    suite = tasks.generate(small_suite(), seed=0)
    tok = train_tokenizer(suite["corpus"], TokenizerSection(vocab_size=400), 128)
    render = load_template(template).render
    fmt = make_format(template)
    sft = [parse_alpaca(Raw(f"s:{i}", row), fmt) for i, row in enumerate(suite["sft"])]
    for row, rec, ex in zip(suite["sft"], sft, encode_sft(sft, tok, 512, False)[0]):
        p, r = old_encode(render(row["instruction"], row["input"]), row["output"], tok)
        assert rec.prompt == render(row["instruction"], row["input"])
        assert ex == {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}
    pairs = [parse_preference(Raw(f"p:{i}", row), fmt) for i, row in enumerate(suite["prefs"])]
    for row, pair in zip(suite["prefs"], encode_preferences(pairs, tok, 512, 256)[0]):
        p, c = old_encode(render(row["instruction"], row["input"]), row["chosen"], tok)
        assert (pair["prompt_ids"], pair["chosen_ids"]) == (p, c)
        assert pair["rejected_ids"] == old_encode("", row["rejected"], tok)[1]
    prompts = [parse_prompt(Raw(f"q:{i}", row), fmt) for i, row in enumerate(suite["eval_prompts"])]
    for row, q in zip(suite["eval_prompts"], encode_prompts(prompts, tok, 256)[0]):
        assert q["prompt_ids"] == old_encode(render(row["instruction"], row["input"]), None, tok)[0]
        assert q["meta"]["answer"] == row["answer"]


def test_task_suite_as_conversations():
    suite = tasks.generate(small_suite(), seed=0)
    talk = tasks.as_conversations(suite)
    assert talk["corpus"] == suite["corpus"] and len(talk["prefs"]) == len(suite["prefs"])
    row = suite["sft"][0]
    assert talk["sft"][0] == {"messages": [user(f"{row['instruction']}\n\n{row['input']}"), assistant(row["output"])],
                              "task": row["task"], "answer": row["answer"]}
    tok = chatml()
    fmt = make_format("chat", tok)
    for name, parse in (("sft", parse_alpaca), ("prefs", parse_preference)):
        for alpaca, conv in zip(suite[name], talk[name]):
            assert parse(Raw("a", alpaca), fmt) == parse(Raw("a", conv), fmt)  # the same rendering either way
    for alpaca, conv in zip(suite["eval_prompts"], talk["eval_prompts"]):
        rec = parse_prompt(Raw("a", conv), fmt)
        assert rec.prompt == parse_prompt(Raw("a", alpaca), fmt).prompt and tasks.has_gold(rec.meta)


def test_the_task_corpus_can_state_instances_after_a_chat_prompt_and_pretraining_learns_those_tokens():
    """tasks.corpus_template: a prompt-form statement becomes ChatML's prompt for the user turn followed by the
    answer (as the plain form is the plain prompt followed by the answer; neither ends the reply), drawing no
    random numbers: every split and every other corpus line is as in the plain corpus. tokenizer.chat_template:
    the new tokenizer has <|im_start|>/<|im_end|> as single special tokens and renders the chat prompts that SFT
    trains."""
    from data_formats.chat import load_chat_template, render_conversation
    from stages.pretrain import train_tokenizer

    source = load_chat_template("chatml")
    cfg = small_suite(families=list(tasks.FAMILIES))
    plain = tasks.generate(cfg, seed=0)
    chat = tasks.generate(cfg, seed=0, render=lambda m: render_conversation(source, m, add_generation_prompt=True))
    assert {k: v for k, v in chat.items() if k != "corpus"} == {k: v for k, v in plain.items() if k != "corpus"}
    turns = 0
    for p_doc, c_doc in zip(plain["corpus"], chat["corpus"], strict=True):
        lines = iter(p_doc.split("\n"))
        rebuilt = []
        for line in lines:  # a prompt-form statement is three lines: instruction, list, answer
            family = next((f for f, fam in tasks.FAMILIES.items() if fam.instruction == line), None)
            if family is None:
                rebuilt.append(line)
                continue
            items, answer = next(lines), next(lines)
            rebuilt.append(f"<|im_start|>user\n{line}\n\n{items}<|im_end|>\n<|im_start|>assistant\n{answer}")
            turns += 1
        assert "\n".join(rebuilt) == c_doc
    assert turns > 100
    tok = train_tokenizer(chat["corpus"], TokenizerSection(vocab_size=400, chat_template="chatml"), 128)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tok(chat["corpus"][0], add_special_tokens=False)["input_ids"]
    assert ids.count(start) == chat["corpus"][0].count("<|im_start|>") > 0 and end in ids
    row = plain["eval_prompts"][0]
    prompt = [user(f"{row['instruction']}\n\n{row['input']}")]
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>" + render_conversation(source, prompt, add_generation_prompt=True)  # BOS as documents
    assert stop_token_ids(tok) == [tok.eos_token_id, end]


def test_the_tasks_stage_writes_a_chat_corpus_as_jsonl(chain, tmp_path):
    """Turns hold blank lines, which separate the documents of a .txt corpus: the chat corpus is corpus.jsonl."""
    from rlhf.data import read_corpus
    from tests.chain import run_stage

    data = run_stage("tasks", chain["root"], "tasks.format=messages", "tasks.corpus_template=chatml",
                     f"output_dir={tmp_path}/tasks")
    assert not (data / "corpus.txt").exists()
    docs = read_corpus([str(data / "corpus.jsonl")])
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(docs) == manifest["files"]["corpus.jsonl"] == (chain["tasks"] / "corpus.txt").read_text().count(
        "\n\n") + 1
    assert sum("<|im_start|>assistant\n" in d for d in docs) > len(docs) / 2


def test_a_chat_chain_on_the_task_suite_as_conversations(chain, tmp_path):
    """tasks (format: messages) -> sft with data.template chat and the shipped ChatML on the base model ->
    dpo -> eval with each model's chat template."""
    from rlhf.models import load_model
    from tests.chain import run_stage

    data = run_stage("tasks", chain["root"], "tasks.format=messages", f"output_dir={tmp_path}/tasks")
    first = json.loads((data / "sft.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"] and "answer" in first
    sft = run_stage("sft", chain["root"], f"data.train={data}/sft.jsonl", "data.eval=null", "data.template=chat",
                    "model.chat_template=chatml", "train.max_steps=2", "train.eval_every=0",
                    f"output_dir={tmp_path}/sft")
    tok = AutoTokenizer.from_pretrained(sft / "model")
    assert tok.apply_chat_template([user("hi")], tokenize=False, add_generation_prompt=True) == \
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    base_vocab = AutoTokenizer.from_pretrained(chain["pretrain"] / "model").__len__()
    assert len(tok) == base_vocab + 2  # <|im_start|>, <|im_end|>; the adapter carries the grown embeddings
    assert load_model(str(sft)).get_input_embeddings().weight.shape[0] == len(tok)
    assert "<\\|im_start\\|>assistant<br> |" in (sft / "samples.md").read_text()  # sampled after the chat prompt
    dpo = run_stage("dpo", chain["root"], f"model.name_or_path={sft}", f"data.train={data}/prefs.jsonl",
                    "data.eval=null", "data.template=chat", "train.max_steps=2", "train.eval_every=0",
                    f"output_dir={tmp_path}/dpo")
    assert AutoTokenizer.from_pretrained(dpo / "model").chat_template == tok.chat_template
    result = run_stage("eval", chain["root"], f"eval.models={{sft: {sft}, dpo: {dpo}}}", "eval.template=chat",
                       f"eval.prompts={data}/eval_prompts.jsonl", "eval.max_prompts=8", f"eval.reference={sft}",
                       f"output_dir={tmp_path}/eval")
    results = json.loads((result / "eval.json").read_text())["results"]
    assert [r["gold_prompts"] for r in results] == [8, 8]
    assert all(s["prompt"].endswith("<|im_start|>assistant\n") for r in results for s in r["samples"])
    assert all(r["reward_score"] is not None for r in results)  # the text RM of the chain scores chat rollouts
    # PPO of the chat policy against the chain's text-template RM (scored through text; the critic cannot
    # start from an RM of another vocabulary), with the gold monitor; then its export
    ppo = run_stage("ppo", chain["root"], f"model.name_or_path={sft}", f"data.train={data}/prompts.jsonl",
                    "data.template=chat", f"ppo.gold_prompts={data}/eval_prompts.jsonl", "ppo.critic_init=actor",
                    f"output_dir={tmp_path}/ppo")
    metrics = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert sum("objective/score" in m for m in metrics) == 2 and "gold/proxy_score" in metrics[-1]
    export = run_stage("export", chain["root"], f"source={ppo}", f"output_dir={tmp_path}/export")
    exported = export / "model"
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == stop_token_ids(tok) == \
        [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    card = (exported / "README.md").read_text()
    assert "<|im_start|>user\n<instruction><|im_end|>\n<|im_start|>assistant\n<response>" in card
    assert "Generation stops at any of `</s>`, `<|im_end|>`" in card


# --- stop tokens in eval and sample tables; reward models that read another format ------------------------------


class EndOfTurn(torch.nn.Module):
    """A stand-in causal LM that always writes `token` (e.g. <|eot_id|>, not EOS)."""

    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, input_ids, **_):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[..., self.token] = 5.0
        return SimpleNamespace(logits=logits)


def test_eval_and_sample_tables_stop_at_the_end_of_turn():
    """A Llama-3-style model ends its reply with <|eot_id|>, not EOS: eval's EOS rate, lengths and the SFT
    sample table count that as an ending (with EOS alone the reply would run to max_new_tokens)."""
    from rlhf.rollout import complete
    from rlhf.sections import GenerateSection
    from stages.eval import evaluate_model

    tok = llama3()
    tok.pad_token = "<|finetune_right_pad_id|>"
    fmt = make_format("chat", tok)
    records = [parse_prompt(Raw(f"p:{i}", {"messages": [user(f"Sort.\n\n{x}")]}), fmt) for i, x in enumerate("abc")]
    prompts, _ = encode_prompts(records, tok, 64)
    model = EndOfTurn(tok.convert_tokens_to_ids("<|eot_id|>"), len(tok))
    cfg = GenerateSection(max_new_tokens=5, temperature=0.0)
    stops = stop_token_ids(tok)
    result = evaluate_model("m", model, tok, prompts, cfg, "cpu", None, None, False, 1, stop_ids=stops, fmt=fmt)
    assert (result["eos_rate"], result["response_length"]) == (1.0, 1.0)
    assert evaluate_model("m", model, tok, prompts, cfg, "cpu", None, None, False, 1,
                          stop_ids=[tok.eos_token_id])["eos_rate"] == 0.0
    rows = complete(model, tok, [p["prompt_ids"] for p in prompts], cfg, "cpu", stop_ids=stops)
    assert [(r["ended"], r["tokens"], r["completion"]) for r in rows] == [(True, 1, "")] * 3


def generation(prompt_ids: list[int], responses: list[list[int]], ended: list[bool], pad_id: int):
    """A Generation of one prompt and several responses (right-padded)."""
    from rlhf.batching import pad
    from rlhf.rollout import Generation

    mask = pad([[1] * len(r) for r in responses], 0)
    seqs = torch.cat([torch.tensor([prompt_ids] * len(responses)), pad(responses, pad_id)], 1)
    attention = torch.cat([torch.ones(len(responses), len(prompt_ids), dtype=torch.long), mask], 1)
    return Generation(seqs, attention, mask, torch.tensor(ended), len(prompt_ids))


def test_a_reward_model_reads_the_format_it_was_trained_with(chain, tmp_path):
    """A chat-templated policy scored by the chain's text-template RM, and the text policy by a chat-template RM:
    the RM reads each response as its training rendered a pair (its prompt format, its end token only where the
    response ended, BOS once), never the policy's text."""
    from rlhf.scoring import load_scorer
    from tests.chain import run_stage

    chat_rm = run_stage("rm", chain["root"], "model.chat_template=chatml", "data.template=chat", "train.max_steps=2",
                        "train.eval_every=0", f"output_dir={tmp_path}/rm")
    row = json.loads((chain["tasks"] / "prefs_eval.jsonl").read_text().splitlines()[0])
    chat_policy = load_tokenizer(str(chain["sft"]), chat_template="chatml")
    text_policy = load_tokenizer(str(chain["sft"]))
    for policy, template, rm, rm_template in ((chat_policy, "chat", chain["rm"], "plain"),
                                              (text_policy, "plain", chat_rm, "chat")):
        scorer = load_scorer(str(rm))
        fmt = make_format(template, policy)
        assert not scorer.reads_ids_of(policy, fmt) and scorer.reads_ids_of(scorer.tokenizer, scorer.format)
        [prompt], _ = encode_prompts([parse_prompt(Raw("p:1", row), fmt)], policy, 64)
        end = policy.convert_tokens_to_ids(fmt.end) if fmt.chat else policy.eos_token_id
        chosen, rejected = (policy(row[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected"))
        gen = generation(prompt["prompt_ids"], [chosen + [end], rejected], [True, False], policy.pad_token_id)
        # what the rm stage trained on: the pair in the RM's own format; a cut response has no end token
        pair = parse_preference(Raw("p:1", row), make_format(rm_template, scorer.tokenizer))
        [ids], _ = encode_preferences([pair], scorer.tokenizer, 256, 128)
        expected = [ids["prompt_ids"] + ids["chosen_ids"], ids["prompt_ids"] + ids["rejected_ids"][:-1]]
        assert ids["chosen_ids"][-1] == scorer.end_id
        want = torch.cat([scorer.score_ids(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
                          for x in expected])
        assert torch.allclose(scorer.score_generation(gen, [prompt, prompt], policy, fmt), want, atol=1e-6)
        assert scorer.encode(prompt, row["chosen"], True).count(scorer.tokenizer.bos_token_id) == 1
