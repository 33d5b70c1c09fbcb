"""Experiment trackers (`train.report_to`): accelerate's own integrations, started and fed by the scaffold.

metrics.jsonl is always written (`rlhf.metrics.MetricsLog`). Each name in `train.report_to` is an
accelerate tracker (`Accelerator(log_with=...)`, `init_trackers`, `log`), so TensorBoard, W&B, MLflow,
trackio, ... receive the same flat `group/name` metrics at the same steps; only the main process logs.

    run name   the run folder's name (runs/tiny/sft -> sft)
    project    `train.tracker_project`, by default the name of the folder holding the run folder (tiny):
               the W&B / trackio project, the MLflow experiment, and TensorBoard's `tb/<project>/`
    config     the resolved recipe, flattened to dotted keys (`train.lr`)
    resume     the tracker runs' ids are kept in the checkpoint state: a resumed run logs into the same
               W&B run (id, resume="allow"), MLflow run (run_id) and trackio run (name), and TensorBoard
               hides the events logged after the checkpoint (purge_step)

Trackers are configured the usual way for each service (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, ...).
"""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

from rlhf.errors import RecipeError, describe

KEY = "train.report_to"


def available() -> set[str]:
    """Trackers whose package is installed, as accelerate decides it (it drops the others silently)."""
    from accelerate.tracking import get_available_trackers

    return {str(t) for t in get_available_trackers()}


def check_installed(report_to: list[str]) -> None:
    """A tracker whose package is missing is a one-line recipe error, raised before any model is loaded."""
    missing = [name for name in report_to if name not in available()]
    if missing:
        raise RecipeError(f"{', '.join(missing)} is not installed: pip install 'rlhf[tracking]' (or pip install "
                          f"{' '.join(missing)}), or remove it from the list", None, KEY)
    if "mlflow" in report_to:
        check_mlflow()


def check_mlflow() -> None:
    """Open MLflow's tracking store now, before any model loads: MLflow >= 3.18 refuses its file store unless
    MLFLOW_ALLOW_FILE_STORE=true, and `mlflow-skinny` cannot open the default SQLite store (no SQLAlchemy)."""
    try:
        import mlflow

        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:
        raise RecipeError(f"mlflow cannot open its tracking store {_mlflow_uri()!r} ({describe(err)}): set "
                          f"MLFLOW_TRACKING_URI to a server (http://...) or a store it can open (e.g. "
                          f"MLFLOW_TRACKING_URI=file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true), or remove mlflow "
                          f"from the list", None, KEY) from None


def _mlflow_uri() -> str:
    try:
        import mlflow

        return str(mlflow.get_tracking_uri())[:120]
    except Exception:
        return "?"


def logging_dir(output_dir: str | Path) -> Path:
    """Where TensorBoard writes: `tb/` in the run's `.partial` folder (`RunFolder`), moved with it at the end."""
    final = Path(output_dir)
    return final.parent / (final.name + ".partial") / "tb"


def flat_config(resolved: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The resolved recipe as dotted keys with scalar values (TensorBoard's hparams and MLflow's params take only
    scalars): lists, null and empty sections become their JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for name, value in resolved.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, key + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics dict (trackers take numbers; metrics.jsonl keeps non-finite ones as null)."""
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


# tracker name -> the id of its run, read from the started tracker's own object (`GeneralTracker.tracker`)
RUN_IDS = {"wandb": lambda run: run.id, "mlflow": lambda run: run.info.run_id}


def start(accelerator, folder, train, state: dict) -> None:
    """Start the trackers of `accelerator.log_with` (main process only); `state` is the scaffold's checkpointed
    state, where the tracker run ids are kept (`state['tracker_runs']`) for a resumed run to continue them."""
    if not accelerator.log_with:
        return
    runs = state.setdefault("tracker_runs", {})
    name = folder.final.name
    project = train.tracker_project or Path(os.path.abspath(folder.final)).parent.name or "rlhf"
    init_kwargs = {
        "wandb": {"name": name, **({"id": runs["wandb"], "resume": "allow"} if "wandb" in runs else {})},
        "mlflow": {"run_name": name, "run_id": runs.get("mlflow")},
        "trackio": {"name": name, "resume": "allow" if folder.resuming else "never"},
    }
    if folder.resuming:
        # hide the events of steps after the checkpoint (logged before the crash, logged again now); the first
        # step logged from here is state['step'] + 1
        init_kwargs["tensorboard"] = {"purge_step": state["step"] + 1}
    accelerator.init_trackers(project, config=flat_config(folder.resolved), init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name in RUN_IDS:
                runs[tracker.name] = RUN_IDS[tracker.name](tracker.tracker)


def log(accelerator, step: int, metrics: dict) -> None:
    accelerator.log(scalars(metrics), step=step)


def finish(accelerator) -> None:
    """Close every tracker run. Not `accelerator.end_training()`: that also destroys the process group, which the
    stage still needs after its loop (saving the model, finishing the run folder)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
