"""What every training loop needs around its steps, written once: resume, the metrics log, the progress
bar, Ctrl-C, and checkpoints on their cadence. The supervised loop (`rlhf.loop`) and PPO (`stages/ppo.py`)
both run inside it, so their own code shows only what a step does.

    scaffold = Scaffold(accelerator, folder, recipe.train, total, "ppo", models, optimizers, schedulers,
                        stateful={"guard": guard, ...})
    for step in scaffold.steps():      # 0-based; resumes where the checkpoint left off
        ...                            # one optimizer step (PPO: one iteration)
        scaffold.log(step + 1, metrics, progress={"loss": ...})
    final = scaffold.close()           # the last value of every logged metric

A checkpoint holds the models' trainable weights, optimizers, schedulers, RNG states (`rlhf.checkpoint`),
`scaffold.state` (plain values: step, metrics-log offset, final metrics, tracker run ids, anything a stage
adds) and the `state_dict()` of every `stateful` object (step guard, KL controller, monitor, ...).
Every metrics line goes to metrics.jsonl and to the recipe's trackers (`train.report_to`, `rlhf.tracking`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from tqdm import tqdm

from rlhf import checkpoint, tracking
from rlhf.metrics import MetricsLog
from rlhf.errors import Interrupted, UserError, describe
from rlhf.runtime import Interrupt, global_sum


class Scaffold:
    def __init__(self, accelerator, folder, train, total: int, desc: str, models: dict, optimizers: dict,
                 schedulers: dict, stateful: dict | None = None, unit: str = "step"):
        self.accelerator, self.folder, self.train, self.total = accelerator, folder, train, total
        self.desc, self.unit = desc, unit
        self.models, self.optimizers, self.schedulers = models, optimizers, schedulers
        self.stateful = stateful or {}
        self.state: dict = {"step": 0, "metrics_offset": None, "final": {}}
        if folder.resuming:
            ckpt = folder.latest_checkpoint()
            folder.check_resume_recipe(checkpoint.read_state(ckpt).get("recipe_sha256"))
            try:
                saved = checkpoint.load(ckpt, accelerator, models, optimizers, schedulers)
            except Exception as err:  # sealed and intact, yet not loadable (another version's, another model's)
                raise UserError(f"checkpoint {ckpt} cannot be loaded ({describe(err)}); pass resume=false to start "
                                f"over", None, "resume") from None
            for name, obj in self.stateful.items():
                obj.load_state_dict(saved.pop(name))
            self.state.update(saved)
            if accelerator.is_main_process:
                print(f"resuming from {ckpt} ({unit} {self.state['step']} of {total})", file=sys.stderr)
        self.metrics = MetricsLog(folder.partial, accelerator.is_main_process, self.state["metrics_offset"])
        tracking.start(accelerator, folder, train, self.state)
        self.final: dict[str, float] = dict(self.state["final"])
        self._bar: tqdm | None = None

    @property
    def step(self) -> int:
        """Steps done so far (the next step's 0-based index)."""
        return self.state["step"]

    def steps(self) -> Iterator[int]:
        """Yield the index of every step still to run. After each one: progress, Ctrl-C (a checkpoint, then
        `Interrupted`) and the `train.save_every` cadence."""
        accelerator, train = self.accelerator, self.train
        self._bar = tqdm(total=self.total, initial=self.step, desc=self.desc, dynamic_ncols=True, file=sys.stderr,
                         disable=not accelerator.is_main_process, mininterval=0.1 if sys.stderr.isatty() else 15.0)
        with Interrupt() as interrupt, self._bar:
            while self.step < self.total:
                yield self.step
                self.state["step"] = step = self.step + 1
                self._bar.update(1)
                # every process must take the same decision (the checkpoint save is collective)
                stop = float(global_sum(accelerator, float(interrupt.requested))) > 0 \
                    if accelerator.num_processes > 1 else interrupt.requested
                if (train.save_every and step % train.save_every == 0 and step < self.total) or stop:
                    self.save_checkpoint()
                if stop:
                    self.close()
                    raise Interrupted(f"interrupted at {self.unit} {step} of {self.total}; checkpoint saved in "
                                      f"{self.folder.checkpoints}")

    def log(self, step: int, metrics: dict[str, float], progress: dict[str, str] | None = None) -> None:
        """One line of metrics.jsonl and of every tracker; the values also become the run's final metrics."""
        self.metrics.log(step, metrics)
        tracking.log(self.accelerator, step, metrics)
        self.final.update(metrics)
        if progress and self._bar is not None:
            self._bar.set_postfix(progress, refresh=False)

    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        self.state.update(metrics_offset=self.metrics.offset(), recipe_sha256=self.folder.recipe_hash(),
                          final=self.final, inputs=self.folder.inputs,
                          **{name: obj.state_dict() for name, obj in self.stateful.items()})
        checkpoint.save(self.folder.checkpoints, self.step, self.accelerator, self.state, self.models,
                        self.optimizers, self.schedulers, self.train.keep_checkpoints)

    def close(self) -> dict[str, float]:
        """End of training: close the tracker runs; returns the final metrics."""
        tracking.finish(self.accelerator)
        return self.final


class Stopwatch:
    """Wall seconds of named phases: `with watch("time/generate_s"): ...`, then `watch.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started  # summed over uses
