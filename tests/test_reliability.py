"""Crash safety: kill-and-resume, atomic checkpoints, refusing to overwrite, non-finite guards; and the
promises of issue 17: nothing lost, nothing outside the run touched (overwrite, links, inputs, locks,
signals, incomplete checkpoints, changed inputs, skipped steps, generation limits, unexpected errors)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf import checkpoint
from rlhf.cli import main
from tests.chain import ROOT, cli_args, run_stage


def lines(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock figures."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.append({k: v for k, v in m.items() if not k.startswith(("perf/", "time/"))})
    return out


def kill_after_checkpoint(args: list[str], partial: Path, step: int) -> None:
    """Start a CLI run and SIGKILL it as soon as checkpoint `step` is complete."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = partial / "checkpoints" / f"step-{step:08d}" / "state.json"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("stage, extra, kill_at", [
    ("sft", ["train.max_steps=60", "train.epochs=10", "train.save_every=10", "train.log_every=3"], 10),
    ("ppo", ["train.max_steps=10", "train.save_every=2", "ppo.gold_every=3"], 2),
    # the adaptive KL coefficient moves by up to 20% per iteration (16 episodes over a horizon of 16), so a
    # resume that forgot the controller's state would log a different kl_coef after the checkpoint; reward statistics
    # measured on the starting policy must come back from the checkpoint, not be measured again on a trained one
    pytest.param("ppo", ["train.max_steps=4", "train.save_every=2", "ppo.gold_every=0", "ppo.kl_control=adaptive",
                         "ppo.kl_budget=0.5", "ppo.kl_horizon=16", "ppo.reward_stats=policy"], 2,
                 id="ppo-adaptive-kl-policy-stats"),
    pytest.param("ppo", ["train.max_steps=4", "train.save_every=2", "ppo.gold_every=0", "ppo.advantage_estimator=grpo",
                         "ppo.samples_per_prompt=2", "ppo.reward_fn=gold", "ppo.reward_model=null"], 2, id="grpo"),
])
def test_sigkill_then_resume_matches_an_uninterrupted_run(chain, tmp_path, stage, extra, kill_at):
    whole = run_cli(cli_args(stage, chain["root"], *extra, f"output_dir={tmp_path}/whole"))
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    args = cli_args(stage, chain["root"], *extra, f"output_dir={killed}")
    kill_after_checkpoint(args, Path(f"{killed}.partial"), kill_at)
    assert not killed.exists()  # nothing appears in place of a finished run
    resumed = run_cli(args)  # the same command resumes by itself
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed}.partial/checkpoints/step-{kill_at:08d}" in resumed.stderr
    assert lines(killed) == lines(tmp_path / "whole")  # bit-identical on CPU
    if "ppo.kl_control=adaptive" in extra:
        coefs = [m["kl_coef"] for m in lines(killed) if "kl_coef" in m]
        assert coefs[kill_at] != coefs[0]  # the first iteration after the resume starts from a moved coefficient
    assert json.loads((killed / "manifest.json").read_text())["metrics"]["train/loss" if stage == "sft"
                                                                         else "objective/score"] is not None


class Crash(Exception):
    pass


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 1, acc, {"step": 1}, {"model": model}, {"model": opt}, {"model": sched}, keep=2)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    real = checkpoint.write_json_atomic

    def crash(path, obj):
        raise Crash()  # the process dies while writing checkpoint 2

    monkeypatch.setattr(checkpoint, "write_json_atomic", crash)
    with pytest.raises(Crash):
        checkpoint.save(folder, 2, acc, {"step": 2}, {"model": model}, {"model": opt}, {"model": sched}, keep=2)
    monkeypatch.setattr(checkpoint, "write_json_atomic", real)
    complete = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
    assert complete == ["step-00000001"]
    state = checkpoint.load(folder / "step-00000001", acc, {"model": model}, {"model": opt}, {"model": sched})
    assert state == {"step": 1} and torch.equal(model.weight, saved)
    # the next save cleans the leftover and keeps only the most recent `keep` checkpoints
    for step in (2, 3, 4):
        checkpoint.save(folder, step, acc, {"step": step}, {"model": model}, {"model": opt}, {"model": sched},
                        keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000003", "step-00000004"]


def test_a_finished_run_is_never_overwritten_by_accident(chain, tmp_path, capsys):
    out = run_stage("sft", chain["root"], "train.max_steps=2", f"output_dir={tmp_path}/run")
    before = (out / "manifest.json").read_text()
    args = cli_args("sft", chain["root"], "train.max_steps=2", f"output_dir={out}")
    assert main(args) == 2
    assert "holds a finished run; pass overwrite=true" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert main(args + ["resume=true"]) == 0  # same recipe: kept as it is
    assert (out / "manifest.json").read_text() == before
    assert main(args[:-1] + ["train.max_steps=3", f"output_dir={out}", "resume=true"]) == 2
    assert "different recipe" in capsys.readouterr().err
    assert main(args + ["overwrite=true"]) == 0
    assert (out / "manifest.json").read_text() != before
    assert not list(tmp_path.glob(".run.old-*"))


@pytest.mark.parametrize("policy, message", [
    ("stop", r"non-finite (loss|gradient norm) \((nan|inf)\) at step 2; stopping \(train.on_nonfinite=stop\)"),
    ("skip", r"non-finite (loss|gradient norm) \((nan|inf)\) at step 4; stopping \(more than 2 skipped steps\)"),
])
def test_non_finite_loss_stops_with_the_step_and_quantity(chain, tmp_path, capsys, policy, message):
    args = cli_args("sft", chain["root"], "train.max_steps=10", "train.lr=1e30", "lora=null",
                    "train.max_grad_norm=null", "train.warmup_ratio=0", f"train.on_nonfinite={policy}",
                    "train.max_nonfinite=2", f"output_dir={tmp_path}/nan")
    assert main(args) == 2
    assert re.fullmatch(f"error: {message}", capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "nan").exists() and not (tmp_path / "nan.partial").exists()


def signal_after(args: list[str], out: Path, sig: int, lines: int) -> tuple[int, str]:
    """Start a CLI run, send it `sig` once its metrics.jsonl has `lines` lines; (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = Path(f"{out}.partial") / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(chain, tmp_path):
    out = tmp_path / "intr"
    args = cli_args("sft", chain["root"], "train.max_steps=400", "train.epochs=30", "train.save_every=0",
                    "train.log_every=1", f"output_dir={out}")
    code, err = signal_after(args, out, signal.SIGINT, 3)
    assert code == 130, err
    assert "checkpoint saved" in err and "resume with the same command" in err
    step = int(err.split("interrupted at step ")[1].split()[0])
    assert (Path(f"{out}.partial") / "checkpoints" / f"step-{step:08d}" / "state.json").is_file()
    resumed = run_cli(args)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["metrics"]["train/steps"] == 400


# --- issue 17: nothing lost, nothing outside the run touched ---------------------------------------------


def user_files(folder: Path) -> dict[str, str]:
    """A folder of a user's own files (no manifest): what overwrite=true must never replace."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": "my notes\n", "data.csv": "a,b\n1,2\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def tasks_args(chain, *extra: str) -> list[str]:
    return cli_args("tasks", chain["root"], *extra)


@pytest.mark.parametrize("kind", ["user files", "the current folder", "a foreign manifest"])
def test_overwrite_replaces_only_a_finished_run(chain, tmp_path, monkeypatch, capsys, kind):
    folder = tmp_path / "mine"
    files = user_files(folder)
    out = str(folder)
    if kind == "the current folder":
        monkeypatch.chdir(folder)
        out = "."
    if kind == "a foreign manifest":  # another tool's manifest.json does not make a run of this pipeline
        files["manifest.json"] = '{"name": "my dataset", "version": 3}\n'
        (folder / "manifest.json").write_text(files["manifest.json"])
    assert main(tasks_args(chain, f"output_dir={out}", "overwrite=true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output_dir: "), err
    assert {p.name: p.read_text() for p in folder.iterdir()} == files  # nothing touched
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*old*"))


def nan_run_args(chain, out: Path, *extra: str) -> list[str]:
    """An sft run that checkpoints step 1 and stops on a non-finite loss at step 2: it leaves a `.partial`
    with a checkpoint to resume from, in seconds."""
    return cli_args("sft", chain["root"], "train.max_steps=10", "train.lr=1e30", "lora=null",
                    "train.max_grad_norm=null", "train.warmup_ratio=0", "train.on_nonfinite=stop", "train.save_every=1",
                    "train.log_every=1",
                    "train.eval_every=0", "samples=0", f"output_dir={out}", *extra)


@pytest.mark.parametrize("planted", ["metrics.jsonl", "tb"])
def test_a_link_planted_in_partial_is_refused_never_followed(chain, tmp_path, capsys, planted):
    out = tmp_path / "run"
    args = nan_run_args(chain, out)
    assert main(args) == 2
    partial = Path(f"{out}.partial")
    assert (partial / "checkpoints" / "step-00000001").is_dir()
    victim = tmp_path / "victim"
    if planted == "tb":
        victim.mkdir()
        (victim / "keep.txt").write_text("mine\n")
    else:
        victim.write_text("a file outside the run\n" * 100)
    before = sorted(str(p) for p in victim.rglob("*")) if victim.is_dir() else victim.read_text()
    target = partial / planted
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.symlink_to(victim)
    capsys.readouterr()
    assert main(args) == 2  # resume: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a symbolic link" in err[0] and "resume=false" in err[0], err
    after = sorted(str(p) for p in victim.rglob("*")) if victim.is_dir() else victim.read_text()
    assert after == before
    assert main(args + ["resume=false"]) == 2  # starting over removes the link (and stops on the NaN again)
    assert after == (sorted(str(p) for p in victim.rglob("*")) if victim.is_dir() else victim.read_text())


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.mark.parametrize("case", ["output is the model", "output holds the data", "output inside the data folder"])
def test_a_run_never_writes_over_or_into_its_inputs(chain, tmp_path, capsys, case):
    if case == "output is the model":  # a copy: the session's chain must survive the old behaviour too
        model = copy_run(chain["pretrain"], tmp_path / "pretrain")
        extra, out, key = [f"model.name_or_path={model}", "overwrite=true"], model, "model.name_or_path"
    elif case == "output holds the data":
        tasks = copy_run(chain["tasks"], tmp_path / "tasks")
        extra, out, key = [f"data.train={tasks}/sft.jsonl", "overwrite=true"], tasks, "data.train"
    else:
        data = tmp_path / "data"
        data.mkdir()
        shutil.copy(chain["tasks"] / "sft.jsonl", data / "sft.jsonl")
        extra, out, key = [f"data.train={data}"], data / "out", "data.train"
    before = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    assert main(cli_args("sft", chain["root"], "train.max_steps=2", f"output_dir={out}", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output_dir: ") and f"({key})" in err[0], err
    assert sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()) == before


def hold_lock(partial: Path, content: str = "") -> subprocess.Popen:
    """Another process holding `.partial/.lock` (flock), as a run that has just taken it does."""
    partial.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); print('held', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(partial / ".lock"), content], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_run_lock_is_taken_atomically(chain, tmp_path, capsys):
    """A lock that another process has created but not yet filled in (the instant a check-then-write lock
    races) is held all the same: the second run refuses and touches nothing."""
    out = tmp_path / "run"
    holder = hold_lock(Path(f"{out}.partial"))
    try:
        (Path(f"{out}.partial") / "work.txt").write_text("the other run's file\n")
        assert main(tasks_args(chain, f"output_dir={out}")) == 2  # even before the other run wrote its .owner.json
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another run" in err[0] and "is writing" in err[0], err
        # what a run writes right after taking the lock: its working folder's owner
        (Path(f"{out}.partial") / ".owner.json").write_text(json.dumps({"stage": "tasks", "output_dir": str(out)}))
        assert main(tasks_args(chain, f"output_dir={out}")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another run" in err[0] and "is writing" in err[0], err
        assert (Path(f"{out}.partial") / "work.txt").read_text() == "the other run's file\n"
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(tasks_args(chain, f"output_dir={out}")) == 0  # its holder is gone: the lock is free
    assert not (out / ".lock").exists()


def test_a_stale_lock_whose_pid_was_reused_does_not_block(chain, tmp_path):
    """A killed run's lock names a pid that a new, unrelated process may own now (here: pytest's parent)."""
    out = tmp_path / "run"
    partial = Path(f"{out}.partial")
    partial.mkdir(parents=True)
    (partial / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")
    assert main(tasks_args(chain, f"output_dir={out}")) == 0
    assert (out / "manifest.json").is_file()


def tiny_recipe(out: Path):
    from rlhf.recipes import TasksRecipe

    return TasksRecipe(stage="tasks", output_dir=str(out))


def save_checkpoints(folder, steps: list[int]) -> None:
    import torch
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        checkpoint.save(folder.checkpoints, step, acc, {"step": step, "recipe_sha256": folder.recipe_hash()},
                        {"model": model}, {"model": opt}, {"model": sched}, keep=3)


@pytest.mark.parametrize("damage", ["truncated", "half-deleted", "never sealed"])
def test_resume_passes_over_an_incomplete_checkpoint(tmp_path, capsys, damage):
    from rlhf.artifacts import RunFolder

    out = tmp_path / "run"
    save_checkpoints(RunFolder(tiny_recipe(out)), [1, 2])
    newest = Path(f"{out}.partial") / "checkpoints" / "step-00000002"
    weights = newest / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "half-deleted":  # what a kill inside shutil.rmtree leaves: some files gone, state.json kept
        weights.unlink()
    else:
        (newest / "complete.json").unlink()
    capsys.readouterr()
    folder = RunFolder(tiny_recipe(out))
    assert folder.resuming and folder.latest_checkpoint().name == "step-00000001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: checkpoint {newest} is incomplete"), err


KILLED_IN_FINISH = """
import os, sys
from pathlib import Path
from rlhf import artifacts
from rlhf.recipes import TasksRecipe
from tests.test_reliability import save_checkpoints

folder = artifacts.RunFolder(TasksRecipe(stage="tasks", output_dir=sys.argv[1]))
save_checkpoints(folder, [1])
(folder.partial / "data.jsonl").write_text("{}\\n")
real = os.replace

def replace(src, dst):
    if Path(src) == folder.partial:
        os._exit(9)  # the process is killed right before the final rename
    return real(src, dst)

artifacts.os.replace = replace
folder.finish({})
"""


def test_a_kill_inside_finish_leaves_a_run_the_next_start_completes(tmp_path):
    from rlhf.artifacts import RunFolder

    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_FINISH, str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert not out.exists() and (Path(f"{out}.partial") / "manifest.json").is_file()
    again = RunFolder(tiny_recipe(out))  # the same command again
    assert again.finished and (out / "manifest.json").is_file() and (out / "data.jsonl").is_file()
    assert not Path(f"{out}.partial").exists() and not (out / "checkpoints").exists() and not (out / ".lock").exists()


def test_sigterm_checkpoints_and_an_incomplete_checkpoint_is_passed_over(chain, tmp_path):
    """SIGTERM (schedulers, docker stop) is handled like Ctrl-C: a checkpoint, one line, exit 143. Then the
    newest checkpoint is truncated (as a kill during its clean-up could leave it): the resume warns and
    continues from the older one."""
    out = tmp_path / "term"
    args = cli_args("sft", chain["root"], "train.max_steps=60", "train.epochs=30", "train.save_every=3",
                    "train.log_every=1", "train.keep_checkpoints=3", "samples=0", f"output_dir={out}")
    code, err = signal_after(args, out, signal.SIGTERM, 5)
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: interrupted at step ") and "checkpoint saved" in last and "resume" in last
    step = int(last.split("interrupted at step ")[1].split()[0])
    checkpoints = Path(f"{out}.partial") / "checkpoints"
    newest = checkpoints / f"step-{step:08d}"
    assert newest.is_dir() and step >= 5
    older = sorted(p.name for p in checkpoints.glob("step-*"))[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: checkpoint {newest} is incomplete (model.safetensors has " in resumed.stderr
    assert f"resuming from {checkpoints / older}" in resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["metrics"]["train/steps"] == 60


def test_resume_refuses_an_input_that_changed(chain, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    shutil.copy(chain["tasks"] / "sft.jsonl", data)
    out = tmp_path / "run"
    args = nan_run_args(chain, out, f"data.train={data}")
    assert main(args) == 2 and (Path(f"{out}.partial") / "checkpoints" / "step-00000001").is_dir()
    capsys.readouterr()
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same records, another order: another dataset
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: data.train: {data} changed since the checkpoints"), err
    assert (Path(f"{out}.partial") / "checkpoints" / "step-00000001").is_dir()  # kept: restore the data, resume


def test_a_run_in_which_every_step_was_skipped_fails(chain, tmp_path, monkeypatch, capsys):
    import stages.sft

    # a loss that is NaN at every step (as NaN margins made the rm loss): each step is skipped and counted
    monkeypatch.setattr(stages.sft, "masked_sum", lambda x, mask: (x * mask).sum() * float("nan"))
    out = tmp_path / "run"
    assert main(cli_args("sft", chain["root"], "train.max_steps=3", "train.eval_every=0", "samples=0",
                         f"output_dir={out}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: every one of the 3 steps was skipped as non-finite: nothing was trained; check the "
                       "data (e.g. margins), train.lr and train.mixed_precision"), err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_failed_sample_table_never_costs_the_trained_model(chain, tmp_path, monkeypatch, capsys):
    import stages.sft

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1024.00 GiB")

    monkeypatch.setattr(stages.sft, "complete", broken)
    out = tmp_path / "run"
    assert main(cli_args("sft", chain["root"], "train.max_steps=2", f"output_dir={out}")) == 0
    err = capsys.readouterr().err
    assert ("warning: the sample table (samples.md) failed (RuntimeError: CUDA out of memory. Tried to allocate "
            "1024.00 GiB); the run finishes without it") in err
    assert (out / "manifest.json").is_file() and (out / "model" / "adapter_config.json").is_file()
    assert not (out / "samples.md").exists()


def test_generation_fits_prompts_to_the_model_positions():
    """Every generation path (sft samples, eval, gold prompts, PPO rollouts) goes through `generate`, which
    cuts a prompt from the left (keeping BOS) so that it and the new tokens fit the model's positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.data import fit_prompt
    from rlhf.batching import collate_prompts
    from rlhf.rollout import generate
    from rlhf.sections import GenerateSection

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0)).eval()
    long, short = [1] + list(range(3, 40)) * 3, [1, 5, 6]
    batch = collate_prompts([{"prompt_ids": long}, {"prompt_ids": short}], 0)
    cfg = GenerateSection(max_new_tokens=8, temperature=0.0)
    gen = generate(model, batch["input_ids"], batch["attention_mask"], cfg, stop_ids=[2], pad_id=0)
    assert gen.sequences.shape[1] <= 32 and gen.prompt_width == 24
    kept = gen.sequences[0, :gen.prompt_width].tolist()
    assert kept == fit_prompt(long, 32, 8, 1) == [1] + long[-23:]
    assert gen.sequences[1, :gen.prompt_width][gen.attention_mask[1, :gen.prompt_width].bool()].tolist() == short
    assert fit_prompt(long, None, 8, 1) == long and fit_prompt(short, 32, 8, 1) == short


def test_any_other_error_is_one_line_with_a_debug_hint_and_cleans_up(chain, tmp_path, monkeypatch, capsys):
    import stages.sft

    def broken(*args, **kwargs):
        raise RuntimeError("something unexpected\nwith a second line")

    monkeypatch.setattr(stages.sft, "save_model", broken)
    out = tmp_path / "run"
    args = cli_args("sft", chain["root"], "train.max_steps=2", f"output_dir={out}")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: RuntimeError: something unexpected (re-run with RLHF_DEBUG=1 for "
                                            "the traceback)")
    assert "Traceback" not in err and "second line" not in err
    assert not out.exists() and not Path(f"{out}.partial").exists()
    monkeypatch.setenv("RLHF_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something unexpected"):
        main(args)
    assert not Path(f"{out}.partial").exists()


def test_ppo_prompts_beyond_the_model_positions_warn_once_with_a_count(chain, tmp_path, capsys):
    rows = [{"prompt": "Reverse the list. " * 120 + f"a {c}\n"} for c in "bcdefghijklmnopq"]
    rows += [{"prompt": f"Reverse the list.\na {c}\n"} for c in "bcdefghijklmnopq"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ppo"
    assert main(cli_args("ppo", chain["root"], f"data.train={data}", "data.max_prompt_len=4000", "train.max_steps=1",
                         "ppo.gold_every=0", f"output_dir={out}")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "prompts are longer" in line]
    assert warnings == ["warning: 16 of 32 prompts are longer than the model's 256 positions leave room for (248 "
                        "tokens before 8 new ones); generation cuts them from the left"]
    assert (out / "manifest.json").is_file()
