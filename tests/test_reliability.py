"""Crash safety: kill-and-resume, atomic checkpoints, refusing to overwrite, non-finite guards."""

from __future__ import annotations

import json
import os
import re
import signal
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
    # resume that forgot the controller's state would log a different kl_coef after the checkpoint
    pytest.param("ppo", ["train.max_steps=4", "train.save_every=2", "ppo.gold_every=0", "ppo.kl_control=adaptive",
                         "ppo.kl_target=0.5", "ppo.kl_horizon=16"], 2, id="ppo-adaptive-kl"),
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
