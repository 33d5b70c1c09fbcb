"""`rlhf report` on hand-made run folders (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.report import build_report


def fake_run(folder: Path, stage: str, lines: list[dict], metrics: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "metrics": metrics or {}, "wall_time_s": 3.0}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "sft", "sft", [{"step": s, "train/loss": 3.0 / s} for s in range(1, 6)] +
             [{"step": 5, "eval/loss": 0.9}], {"train/loss": 0.6, "eval/loss": 0.9})
    fake_run(root / "ppo", "ppo", [{"step": s, "objective/score": 0.1 * s, "objective/kl": 0.01 * s,
                                    "objective/entropy": 1.0} for s in range(1, 5)] +
             [{"step": s, "gold/accuracy": 0.5 + 0.1 * s, "gold/proxy_score": 0.2 * s} for s in (0, 2, 4)],
             {"objective/score": 0.4, "gold/accuracy": 0.9})
    ev = fake_run(root / "eval", "eval", [])
    (ev / "eval.json").write_text(json.dumps({"results": [
        {"model": "sft", "gold_accuracy": 0.6, "gold_accuracy_greedy": 0.9, "reward_score": 1.0,
         "kl_to_reference": 0.0, "response_length": 4.0, "eos_rate": 1.0, "gold_accuracy_by_task": {"max": 0.7}},
        {"model": "ppo", "gold_accuracy": 0.8, "gold_accuracy_greedy": 0.95, "reward_score": 2.0,
         "kl_to_reference": 0.3, "response_length": 4.0, "eos_rate": 1.0, "gold_accuracy_by_task": {"max": 0.9}}]}))
    (root / "dpo.partial").mkdir()
    return root


def test_report_has_tables_and_plots(runs, tmp_path):
    readme = build_report([runs], tmp_path / "out")
    text = readme.read_text()
    assert "| model | gold acc. (sampled)" in text and "| ppo | 80.0% | 95.0% |" in text
    assert "| sft | 70.0% |" in text  # per-task table
    assert text.index("## sft") < text.index("## ppo")  # stage order
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["frontier-eval.png", "ppo-ppo.png", "sft-sft.png"]  # the eval's KL-reward frontier too
    for name in pngs:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000
        assert f"]({name})" in text
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<table>" in page and 'src="ppo-ppo.png"' in page


def test_report_cli_and_errors(runs, tmp_path, capsys):
    assert main(["report", str(runs / "sft"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "README.md").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'} not found"
    with pytest.raises(UserError, match="no finished run folders"):
        build_report([runs / "dpo.partial"], tmp_path / "x")


def test_report_skips_damaged_and_foreign_folders(runs, tmp_path, capsys):
    """A manifest without a stage, a broken metrics line, a broken eval.json: warnings, not tracebacks."""
    (runs / "foreign").mkdir()
    (runs / "foreign" / "manifest.json").write_text(json.dumps({"name": "another tool's manifest"}))
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_text("{not json")
    with open(runs / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/loss": 0.5\n[1, 2]\n')
    (runs / "eval" / "eval.json").write_text('{"results": 3}')
    readme = build_report([runs], tmp_path / "out")
    err = capsys.readouterr().err
    assert f"report: skipping {runs / 'foreign'} (its manifest.json names no stage of this pipeline)" in err
    assert f"report: skipping {runs / 'broken'} (" in err and "broken manifest" in err
    assert f"report: {runs / 'sft' / 'metrics.jsonl'}: left out 2 line(s)" in err
    assert "skipping the evaluation table of" in err
    text = readme.read_text()
    assert "## sft" in text and "## ppo" in text and "## Evaluation" not in text


def test_report_on_a_file_is_one_line(runs, tmp_path, capsys):
    assert main(["report", str(runs / "sft" / "metrics.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {runs / 'sft' / 'metrics.jsonl'} is a file, not a run folder "
                                               f"or a folder of run folders")
