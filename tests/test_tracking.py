"""Experiment trackers (`train.report_to`) through accelerate: TensorBoard by default; W&B offline, MLflow on a
local file store and trackio's local database (the `tracking` extra; their tests skip when it is not
installed); resumed runs continuing the same tracker run; a missing package refused before anything loads."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf import tracking
from rlhf.artifacts import RunFolder
from rlhf.cli import main
from rlhf.recipes import load_recipe
from rlhf.runtime import make_accelerator
from rlhf.scaffold import Scaffold
from tests.chain import cli_args, run_stage
from tests.conftest import write_yaml


def toy_run(root: Path, report_to: str, crash_after: int | None = None) -> Path | None:
    """The scaffold of a training stage around a one-weight model: 4 steps, a checkpoint every 2. With
    `crash_after`, the process "dies" after logging that step (its tracker runs end with it)."""
    path = write_yaml(root / "recipe.yaml", {"stage": "sft", "output_dir": str(root / "runs" / "toy"),
                                             "model": {"name_or_path": "unused"}, "data": {"train": "unused.jsonl"},
                                             "train": {"save_every": 2, "lr": 0.1}})
    recipe = load_recipe(path, "sft", [f"train.report_to={report_to}"])
    accelerator = make_accelerator(recipe)
    folder = RunFolder(recipe, accelerator.is_main_process)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaffold = Scaffold(accelerator, folder, recipe.train, 4, "toy", {"model": model}, {"model": optimizer},
                        {"model": scheduler})
    for step in scaffold.steps():
        scaffold.log(step + 1, {"train/loss": 1.0 / (step + 1), "train/broken": float("nan")})
        if step + 1 == crash_after:
            tracking.finish(accelerator)
            return None
    return folder.finish(scaffold.close())


def crash_and_resume(root: Path, report_to: str) -> Path:
    toy_run(root, report_to, crash_after=3)  # checkpoint at step 2, step 3 logged, then the crash
    time.sleep(1.1)  # TensorBoard orders event files by the second they were created in
    return toy_run(root, report_to)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow on a file store, both under tmp_path: nothing reaches the network or $HOME."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told otherwise
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    for name, module in list(sys.modules.items()):  # imported already (by an earlier test): every copy of its folder
        if name.split(".")[0] == "trackio" and isinstance(getattr(module, "TRACKIO_DIR", None), Path):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    (tmp_path / "wandb-home").mkdir()
    yield tmp_path
    if "wandb" in sys.modules:  # W&B keeps its settings (WANDB_DIR, ...) for the process: forget this test's
        sys.modules["wandb"].teardown()


def wandb_history(wandb_dir: Path) -> dict[str, list[tuple[int, dict]]]:
    """run id -> [(step, {key: value})] read from W&B's offline run files (`run-<id>.wandb`: a LevelDB-style log
    of 32 KiB blocks, 7-byte header, records of protobuf `Record`s split into FULL / FIRST / MIDDLE / LAST
    chunks behind a 7-byte checksum-length-type header)."""
    from wandb.proto import wandb_internal_pb2

    runs: dict[str, list[tuple[int, dict]]] = {}
    for file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = file.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # the zero padding at the end of a block
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    runs.setdefault(file.stem.removeprefix("run-"), []).append((record.history.step.num, items))
    return runs


def test_tensorboard_by_default_and_a_resumed_run_hides_the_steps_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = crash_and_resume(tmp_path, "[tensorboard]")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and lines[0]["train/broken"] is None
    (events,) = (run / "tb").iterdir()  # tb/<project>/: the project is the folder holding the run folder
    assert events.name == "runs"
    tb = EventAccumulator(str(events))
    tb.Reload()
    # step 3 was logged before the crash and again after the resume: shown once; step 2 (the checkpoint) kept
    assert [(e.step, round(e.value, 4)) for e in tb.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333),
                                                                              (4, 0.25)]
    assert "train/broken" not in tb.Tags()["scalars"]  # non-finite values are not sent to trackers
    hparams = [p for p in events.rglob("hparams.yml")]
    assert hparams and "train.lr: 0.1" in hparams[0].read_text()  # the resolved recipe, as dotted keys


def test_no_tracker_writes_metrics_jsonl_only(tmp_path):
    run = toy_run(tmp_path, "[]")
    assert not (run / "tb").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_wandb_offline_run_holds_the_metrics_and_a_resumed_run_continues_it(offline):
    pytest.importorskip("wandb", reason="W&B is in the optional `tracking` extra: pip install 'rlhf[tracking]'")
    crash_and_resume(offline, "[wandb]")
    runs = wandb_history(offline / "wandb-home")
    assert len(runs) == 1  # one W&B run id, kept in the checkpoint and resumed
    (history,) = runs.values()
    assert [step for step, _ in history] == [1, 2, 3, 3, 4]  # W&B ignores the repeated step 3 (steps only rise)
    assert [round(items["train/loss"], 4) for _, items in history] == [1.0, 0.5, 0.3333, 0.3333, 0.25]
    assert all("train/broken" not in items for _, items in history)


def test_mlflow_file_store_holds_the_metrics_and_a_resumed_run_continues_it(offline):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is in the optional `tracking` extra: "
                                                  "pip install 'rlhf[tracking]'")
    crash_and_resume(offline, "[mlflow]")
    client = mlflow.tracking.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "runs"]  # the project
    (run,) = client.search_runs([experiment.experiment_id])  # resumed into the same run
    assert run.info.run_name == "toy" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    assert run.data.params["train.save_every"] == "2" and run.data.params["stage"] == "sft"


def test_trackio_local_run_holds_the_metrics_and_a_resumed_run_continues_it(offline):
    pytest.importorskip("trackio", reason="trackio is in the optional `tracking` extra: pip install 'rlhf[tracking]'")
    from trackio.sqlite_storage import SQLiteStorage

    crash_and_resume(offline, "[trackio]")
    assert SQLiteStorage.get_runs("runs") == ["toy"]  # project "runs", one run named after the run folder
    logs = SQLiteStorage.get_logs("runs", "toy")
    assert [(log["step"], round(log["train/loss"], 4)) for log in logs] == [(1, 1.0), (2, 0.5), (3, 0.3333),
                                                                            (3, 0.3333), (4, 0.25)]


def test_a_stage_logs_to_wandb_and_mlflow(chain, offline):
    pytest.importorskip("wandb", reason="W&B is in the optional `tracking` extra: pip install 'rlhf[tracking]'")
    mlflow = pytest.importorskip("mlflow", reason="MLflow is in the optional `tracking` extra: "
                                                  "pip install 'rlhf[tracking]'")
    run = run_stage("sft", chain["root"], "train.max_steps=2", "train.log_every=1", "train.eval_every=2",
                    "train.report_to=[wandb,mlflow]", "train.tracker_project=tracked",
                    f"output_dir={offline}/sft-tracked")
    logged = {key for line in (run / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    (history,) = wandb_history(offline / "wandb-home").values()
    assert {key for _, items in history for key in items} >= logged - {"step"}
    assert [step for step, _ in history] == [1, 2]  # W&B makes one row of step 2's train/* and eval/* lines
    client = mlflow.tracking.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracked"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "sft-tracked" and {"train/loss", "eval/loss"} <= set(mlrun.data.metrics)
    assert not (run / "tb").exists()  # tensorboard was not listed


def test_a_missing_tracker_package_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "available", lambda: {"tensorboard"})  # as if wandb were not installed
    # neither the model nor the data exist: the tracker check must come first, before any loading
    args = cli_args("sft", tmp_path, "train.report_to=[tensorboard,wandb]", "model.name_or_path=/nonexistent")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.report_to: wandb is not installed: pip install 'rlhf[tracking]'")
    assert len(err.splitlines()) == 1 and not list(tmp_path.glob("sft*"))
    assert main(["check", *args[1:]]) == 2  # the pre-flight says so too
    assert "error: train.report_to: wandb is not installed" in capsys.readouterr().err
    assert main(cli_args("sft", tmp_path, "train.report_to=[wandbb]")) == 2
    assert "train.report_to[0]: expected one of 'tensorboard', 'wandb'" in capsys.readouterr().err
