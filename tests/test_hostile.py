"""Hostile inputs, round three (issue 30): files outside the run, runs that finish wrongly, hangs and crashes.
Each test reproduces one reported case; most need no model at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.cli import main
from rlhf.errors import UserError
from tests.chain import cli_args
from tests.test_reliability import save_checkpoints, tiny_recipe


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tasks_run(tmp_path: Path, out: Path, *extra: str) -> int:
    return main(cli_args("tasks", tmp_path / "root", f"output_dir={out}", *extra))


# --- 1-4: files outside the run are never changed -----------------------------------------------------------


def test_a_hard_linked_lock_is_refused_before_it_is_written(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    partial = tmp_path / "out.partial"
    partial.mkdir()
    os.link(victim, partial / ".lock")
    assert tasks_run(tmp_path, tmp_path / "out") == 2
    err = one_error(capsys)
    assert "hard links" in err and str(partial / ".lock") in err
    assert victim.read_text() == "someone else's file\n"


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_a_fifo_or_folder_where_the_lock_belongs_is_one_line(tmp_path, capsys, what):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    os.mkfifo(partial / ".lock") if what == "fifo" else (partial / ".lock").mkdir()
    assert tasks_run(tmp_path, tmp_path / "out") == 2
    assert str(partial / ".lock") in one_error(capsys)


def test_a_hard_linked_metrics_log_is_refused_on_resume(tmp_path, capsys):
    from rlhf.artifacts import RunFolder
    from rlhf.metrics import MetricsLog

    out = tmp_path / "run"
    save_checkpoints(RunFolder(tiny_recipe(out)), [1])
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"mine": 1}\n' * 50)
    os.link(victim, Path(f"{out}.partial") / "metrics.jsonl")
    with pytest.raises(UserError, match="hard links"):
        RunFolder(tiny_recipe(out))
    with pytest.raises(UserError, match="hard links"):  # the writer itself refuses too
        MetricsLog(Path(f"{out}.partial"), True, resume_offset=3)
    assert victim.read_text() == '{"mine": 1}\n' * 50


@pytest.mark.parametrize("resume", ["resume=true", "resume=false"])
def test_a_partial_folder_this_pipeline_did_not_create_is_left_alone(tmp_path, capsys, resume):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "thesis.tex").write_text("my thesis\n")
    (partial / "checkpoints").mkdir()
    assert tasks_run(tmp_path, tmp_path / "out", resume) == 2
    assert "not created by a run of this pipeline" in one_error(capsys)
    assert sorted(p.name for p in partial.iterdir()) == ["checkpoints", "thesis.tex"]


def test_a_finished_run_named_like_a_working_folder_is_left_alone(tmp_path, capsys):
    from rlhf.artifacts import RunFolder

    named = tmp_path / "x.partial"
    RunFolder(tiny_recipe(named)).finish({})
    before = sorted(p.name for p in named.iterdir())
    for extra in ([], ["resume=false"], ["overwrite=true"]):
        assert tasks_run(tmp_path, tmp_path / "x", *extra) == 2
        assert "x.partial" in one_error(capsys)
        assert sorted(p.name for p in named.iterdir()) == before


def test_a_working_folder_of_another_output_dir_is_left_alone(tmp_path, capsys):
    from rlhf.artifacts import RunFolder

    out = tmp_path / "run"
    save_checkpoints(RunFolder(tiny_recipe(out)), [1])
    owner = Path(f"{out}.partial") / ".owner.json"
    owner.write_text(json.dumps({"stage": "sft", "output_dir": str(tmp_path / "elsewhere")}))
    with pytest.raises(UserError, match="working folder of a 'sft' run"):
        RunFolder(tiny_recipe(out))
    assert (Path(f"{out}.partial") / "checkpoints" / "step-00000001").is_dir()


def test_a_run_never_writes_over_an_ancestor_of_its_inputs(chain, tmp_path, capsys):
    """The base model under an SFT adapter is read by every run that uses the adapter, though no recipe names it."""
    base = shutil.copytree(chain["pretrain"], tmp_path / "pretrain")
    sft = shutil.copytree(chain["sft"], tmp_path / "sft")
    manifest = json.loads((sft / "manifest.json").read_text())
    manifest["inputs"]["model"]["path"] = str(base)
    (sft / "manifest.json").write_text(json.dumps(manifest))
    adapter = sft / "model" / "adapter_config.json"
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        cfg["base_model_name_or_path"] = str(base / "model")
        adapter.write_text(json.dumps(cfg))
    before = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    assert main(cli_args("rm", chain["root"], f"model.name_or_path={sft}", f"output_dir={base}", "overwrite=true",
                         "train.max_steps=1")) == 2
    err = one_error(capsys)
    assert "output_dir" in err and "model.name_or_path, made from" in err and str(base) in err
    assert sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("project", ["../../x", "/tmp/abs", "..", "a/b"])
def test_tracker_project_is_a_plain_name(tmp_path, project):
    from rlhf.errors import RecipeError
    from rlhf.recipes import load_recipe
    from tests.chain import write_recipe

    with pytest.raises(RecipeError, match="train.tracker_project"):
        load_recipe(write_recipe("sft", tmp_path), "sft", [f"train.tracker_project={project}"])


# --- 5-9: runs that finish wrongly or exit with the wrong code -----------------------------------------------


def reward_fn_returning(value):
    return lambda prompts, completions, records: [value] * len(completions)


def exits(prompts, completions, records):
    raise SystemExit(0)


@pytest.mark.parametrize("fn, message", [
    (exits, "raised SystemExit: 0"),
    (reward_fn_returning(1e300), "non-finite value in float32"),
    (reward_fn_returning(-1e39), "non-finite value in float32"),
    (reward_fn_returning("1.0"), "must return a list of numbers, got a str"),
    (reward_fn_returning({"a": 1}), "must return a list of numbers, got a dict"),
    (reward_fn_returning(True), "must return a list of numbers, got a bool"),
    (lambda p, c, r: "1" * len(c), "must return a list of numbers, got str"),
    (lambda p, c, r: (_ for _ in ()).throw(ValueError("bad\nsecond line " + "x" * 5000)), "raised ValueError: bad"),
])
def test_a_reward_function_is_checked_in_the_dtype_it_is_used_in(fn, message):
    from rlhf.rewards import call_reward_fn

    with pytest.raises(UserError, match=message) as err:
        call_reward_fn(fn, ["p", "q"], ["a", "b"], [{}, {}])
    assert err.value.key == "ppo.reward_fn" and "\n" not in err.value.line() and len(err.value.line()) < 400


def test_a_reward_function_returning_numbers_passes():
    import numpy as np

    from rlhf.rewards import call_reward_fn

    out = call_reward_fn(lambda p, c, r: [1, np.float64(0.5), 3e38], ["p"] * 3, ["a"] * 3, [{}] * 3)
    assert out.tolist() == pytest.approx([1.0, 0.5, 3e38], rel=1e-6)


def test_exit_inside_a_stage_never_reads_as_finished(tmp_path, monkeypatch, capsys):
    import stages.tasks

    def leave(recipe):
        raise SystemExit(0)

    monkeypatch.setattr(stages.tasks, "run", leave)
    assert tasks_run(tmp_path, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SystemExit" in err[0] and "before the stage finished" in err[0], err


def test_emptying_a_file_beside_the_checkpoints_does_not_disable_the_changed_input_check(tmp_path):
    from rlhf.artifacts import RunFolder

    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    out = tmp_path / "run"
    folder = RunFolder(tiny_recipe(out))
    folder.input("data.train", str(data))
    save_checkpoints_with_inputs(folder, [1])
    for leftover in (Path(f"{out}.partial") / "checkpoints").glob("*.json"):
        leftover.write_text("{}")  # an inputs file beside the checkpoints, if any, is emptied
    data.write_text('{"a": 2}\n')
    again = RunFolder(tiny_recipe(out))
    assert again.resuming
    with pytest.raises(UserError, match="changed since the checkpoints"):
        again.input("data.train", str(data))


def save_checkpoints_with_inputs(folder, steps):
    """`save_checkpoints` with the run's inputs in the checkpoint state, as `Scaffold.save_checkpoint` writes it."""
    import torch
    from accelerate import Accelerator

    from rlhf import checkpoint

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        checkpoint.save(folder.checkpoints, step, acc, {"step": step, "recipe_sha256": folder.recipe_hash(),
                                                        "inputs": folder.inputs},
                        {"model": model}, {"model": opt}, {"model": sched}, keep=3)
    return model, opt, acc


# --- 10-15: hangs, crashes and unreadable errors -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["state.json", "model.optimizer.pt", "safetensors header"])
def test_a_checkpoint_damaged_without_a_size_change_is_passed_over(tmp_path, capsys, damage):
    from rlhf.artifacts import RunFolder

    out = tmp_path / "run"
    save_checkpoints(RunFolder(tiny_recipe(out)), [1, 2])
    newest = Path(f"{out}.partial") / "checkpoints" / "step-00000002"
    target = newest / ("model.safetensors" if damage == "safetensors header" else damage)
    raw = bytearray(target.read_bytes())
    at = 10 if damage != "model.optimizer.pt" else len(raw) // 2
    raw[at] = (raw[at] + 1) % 256  # same size, other content
    target.write_bytes(bytes(raw))
    capsys.readouterr()
    folder = RunFolder(tiny_recipe(out))
    assert folder.resuming and folder.latest_checkpoint().name == "step-00000001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has changed since it was written" in err[0], err


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    import torch

    from rlhf.artifacts import RunFolder

    out = tmp_path / "run"
    folder = RunFolder(tiny_recipe(out))
    save_checkpoints(folder, [1])
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:10])  # what a full disk leaves behind
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="the disk is full") as err:
        save_checkpoints(folder, [2])
    assert str(folder.checkpoints) in err.value.line() and err.value.key == "output_dir"
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["step-00000001"]
    assert folder.latest_checkpoint().name == "step-00000001"


def test_an_intact_checkpoint_that_cannot_be_loaded_is_one_line_naming_it(tmp_path):
    import torch
    from accelerate import Accelerator

    from rlhf import checkpoint

    out = tmp_path / "run"
    folder = RunFolder_(out)
    save_checkpoints(folder, [1])
    ckpt = folder.latest_checkpoint()
    acc = Accelerator(cpu=True)
    other = torch.nn.Linear(5, 2)  # another model's shapes
    from rlhf.scaffold import Scaffold
    from rlhf.sections import TrainSection

    folder = RunFolder_(out)
    with pytest.raises(UserError, match=f"checkpoint {ckpt} cannot be loaded"):
        Scaffold(acc, folder, TrainSection(report_to=[]), 3, "t", {"model": other},
                 {"model": torch.optim.AdamW(other.parameters())}, {})
    assert checkpoint.incomplete_reason(ckpt) is None  # nothing damaged


def RunFolder_(out):
    from rlhf.artifacts import RunFolder

    return RunFolder(tiny_recipe(out))


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "stage: sft\noutput_dir: out\nbomb: *a%d\n" % (levels - 1) + "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [9, 5])
def test_a_yaml_alias_bomb_is_refused_in_a_short_line(tmp_path, capsys, levels):
    import time

    text = alias_bomb(levels)
    text = text.replace("bomb: *a%d\n" % (levels - 1), "") + "bomb: *a%d\n" % (levels - 1)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.perf_counter()
    assert main(["sft", str(path)]) == 2
    assert time.perf_counter() - started < 10
    err = one_error(capsys)
    assert len(err) < 400, len(err)
    if levels == 9:
        assert "alias bomb" in err and f"{path}:" in err


def test_a_self_referring_alias_is_one_line(tmp_path, capsys):
    path = tmp_path / "loop.yaml"
    path.write_text("stage: sft\noutput_dir: out\nx: &x [1, *x]\n")
    assert main(["sft", str(path)]) == 2
    assert "refers to the collection that contains it" in one_error(capsys)


def test_a_huge_bad_value_is_quoted_as_a_short_excerpt(tmp_path, capsys):
    from tests.chain import write_recipe

    assert main(["sft", str(write_recipe("sft", tmp_path)), "train.lr=" + "x" * 500_000]) == 2
    err = one_error(capsys)
    assert len(err) < 400 and "train.lr" in err and "characters)" in err


@pytest.mark.parametrize("body", ["{{- m['role'] + ': <|im_end|>' -}}",
                                  "{{- m['role'] + ': ' + 'OK' + '<|im_end|>' -}}"])
def test_a_chat_template_that_never_writes_the_reply_is_refused(body):
    from data_formats.chat import make_format
    from tests.families import chatml

    tok = chatml()
    tok.chat_template = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}" + body + "{%- else -%}"
                         "{{- m['role'] + ': ' + m['content'] + '<|im_end|>' -}}{%- endif -%}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}")
    with pytest.raises(UserError, match="never writes the assistant's content") as err:
        make_format("chat", tok)
    assert err.value.key == "data.template"


def test_a_chat_template_that_raises_while_rendering_names_the_key():
    from data_formats.chat import make_format
    from tests.families import chatml

    tok = chatml()
    tok.chat_template = "{%- if messages | length > 2 -%}{{ 1 / 0 }}{%- endif -%}" + tok.chat_template
    fmt = make_format("chat", tok)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    with pytest.raises(UserError, match="failed while rendering") as err:
        fmt.prompt(msgs, "f.jsonl:3")
    assert err.value.key == "data.template" and err.value.where == "f.jsonl:3"


def test_a_role_that_is_a_list_names_file_line_and_field():
    from data_formats.chat import read_messages
    from rlhf.errors import DataError

    with pytest.raises(DataError, match="unknown role") as err:
        read_messages([{"role": ["user"], "content": "hi"}], "f.jsonl:7", "messages")
    assert err.value.where == "f.jsonl:7" and err.value.key == "messages[0].role"


@pytest.mark.parametrize("env", [{"MLFLOW_TRACKING_URI": "file:{tmp}/mlruns"}, {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/m.db"}])
def test_a_tracker_that_cannot_start_is_one_line_before_any_model_loads(tmp_path, monkeypatch, env):
    pytest.importorskip("mlflow")
    from rlhf.errors import RecipeError
    from rlhf.runtime import make_accelerator

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    try:  # the store opens here (a full mlflow with SQLAlchemy, or an older file-store MLflow): nothing to refuse
        import mlflow

        mlflow.MlflowClient().search_experiments(max_results=1)
        pytest.skip("this MLflow opens the store")
    except Exception:
        pass
    with pytest.raises(RecipeError, match="mlflow cannot open its tracking store") as err:
        make_accelerator(SimpleNamespace(train=SimpleNamespace(mixed_precision="no", report_to=["mlflow"]),
                                         output_dir=str(tmp_path / "out")))
    assert err.value.key == "train.report_to" and "MLFLOW_TRACKING_URI" in err.value.line()
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err.value.line() and "\n" not in err.value.line()


def test_a_judge_that_is_a_causal_lm_is_refused_by_name(chain):
    from rlhf.scoring import RewardScorer

    with pytest.raises(UserError, match="is a causal language model, not a reward model") as err:
        RewardScorer(str(chain["pretrain"] / "model"), key="eval.judge")
    assert err.value.key == "eval.judge"
    assert RewardScorer(str(chain["rm"]), key="eval.judge").model is not None  # an rm run still loads


@pytest.mark.parametrize("engine", ["seeded", "hf"])
def test_max_new_tokens_is_capped_by_the_model_positions(engine):
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.batching import collate_prompts
    from rlhf.rollout import generate
    from rlhf.sections import GenerateSection

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0)).eval()
    batch = collate_prompts([{"prompt_ids": [1, 5, 6, 7]}], 0)
    cfg = GenerateSection(max_new_tokens=1_000_000_000, temperature=1.0, engine=engine)
    started = time.perf_counter()
    gen = generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop_ids=[39], pad_id=0)
    assert time.perf_counter() - started < 30
    assert gen.sequences.shape[1] <= 32 and gen.prompt_width == 4
    assert cfg.max_new_tokens == 1_000_000_000  # the recipe's section is not changed
