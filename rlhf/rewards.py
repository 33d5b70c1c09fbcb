"""Reward functions: rewards computed by a program instead of (or beside) a learned reward model.

`ppo.reward_fn` names one:
  - `gold`: the task suite's scorer, 1.0 for a correct answer and 0.0 otherwise, from the prompt record's
    `task` / `answer` fields (a verifiable reward);
  - `package.module:function`: any callable `(prompts: list[str], completions: list[str], records: list[dict])
    -> list[float]`, one finite number per completion (`records`: each prompt record's fields, e.g. `answer`).
Import problems are found when the stage starts, before any model is loaded; a wrong result (length,
type, a non-finite value) on the first rollout, before the first update. Both are one line naming
`ppo.reward_fn` (exit 2).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Callable

import numpy as np
import torch

from data_formats.tasks import grade, has_gold
from rlhf.errors import UserError, describe

KEY = "ppo.reward_fn"
RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


def gold_reward(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
    """1.0 where the completion answers the task-suite record exactly (`data_formats.tasks.grade`), else 0.0."""
    return [float(grade(record, completion)) for completion, record in zip(completions, records)]


def load_reward_fn(spec: str) -> RewardFn:
    """`gold` or `package.module:function`, imported now (a problem is a UserError naming ppo.reward_fn)."""
    if spec == "gold":
        return gold_reward
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"expected 'gold' or 'package.module:function', got {spec!r}", None, KEY)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # ImportError, anything the module raises, or exit() while imported
        raise UserError(f"cannot import {module_name[:80]!r}: {describe(err)}", None, KEY) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"module {module_name!r} has no function {name!r}", None, KEY)
    return fn


def reward_fn_source(spec: str) -> str | None:
    """The file that defines a user reward function (hashed into the manifest), None for `gold`."""
    if spec == "gold":
        return None
    try:
        return inspect.getsourcefile(importlib.import_module(spec.partition(":")[0]))
    except TypeError:  # a built-in or extension module
        return None


def check_records(spec: str, records: list[dict]) -> None:
    """`gold` needs the task suite's fields on every prompt record: without them it could only score 0."""
    if spec == "gold":
        missing = sum(1 for record in records if not has_gold(record))
        if missing:
            raise UserError(f"'gold' needs prompt records with the task suite's 'task' and 'answer' fields; "
                            f"{missing} of {len(records)} have none", None, KEY)


def call_reward_fn(fn: RewardFn, prompts: list[str], completions: list[str], records: list[dict]) -> torch.Tensor:
    """(B,) float32 rewards of `fn`, checked: a list of B finite numbers."""
    try:
        out = fn(list(prompts), list(completions), [dict(r) for r in records])
    except (Exception, SystemExit) as err:  # exit(0) inside it must not end the stage as if it had finished
        raise UserError(f"raised {describe(err)}", None, KEY) from None
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist()
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise UserError(f"must return a list of numbers, got {type(out).__name__}", None, KEY)
    # numbers only: a string or a dict is refused, not coerced by float()
    wrong = [v for v in out if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_))]
    if wrong:
        raise UserError(f"must return a list of numbers, got a {type(wrong[0]).__name__} ({str(wrong[0])[:40]!r})",
                        None, KEY)
    if len(out) != len(completions):
        raise UserError(f"returned {len(out)} values for {len(completions)} completions", None, KEY)
    values = torch.tensor([float(v) for v in out], dtype=torch.float64).to(torch.float32)
    bad = [v for v, v32 in zip(out, values.tolist()) if not math.isfinite(v32)]
    if bad:  # checked in float32, the dtype the rewards are used in: 1e300 is finite in float64 only
        raise UserError(f"returned a non-finite value in float32, the dtype rewards are used in ({str(bad[0])[:40]})",
                        None, KEY)
    return values

