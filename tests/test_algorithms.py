"""The registered algorithms (rlhf.registry): advantage estimators, policy losses, preference losses. Recipe
validation and help read the registries; every statistic a loss returns is reduced as it declares."""

from __future__ import annotations

import pytest
import torch

from rlhf.cli import main, stage_help
from rlhf.ppo import UpdateStats
from rlhf.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES
from tests.chain import cli_args


def test_the_help_and_the_accepted_names_come_from_the_registries():
    ppo_help, dpo_help = "\n".join(stage_help("ppo")), "\n".join(stage_help("dpo"))
    for name in ADVANTAGE_ESTIMATORS:
        assert f"{name} = {ADVANTAGE_ESTIMATORS[name].help}" in ppo_help
    for name in POLICY_LOSSES:
        assert f"{name} = {POLICY_LOSSES[name].help}" in ppo_help
    for name in PREFERENCE_LOSSES:
        assert f"{name} = {PREFERENCE_LOSSES[name].help}" in dpo_help
    assert ADVANTAGE_ESTIMATORS["gae"].needs_critic and not ADVANTAGE_ESTIMATORS["grpo"].needs_critic
    assert ADVANTAGE_ESTIMATORS["rloo"].needs_groups and ADVANTAGE_ESTIMATORS["reinforce_pp"].whiten == "always"


def test_an_unknown_estimator_lists_the_registered_names(chain, tmp_path, capsys):
    assert main(cli_args("ppo", chain["root"], "ppo.advantage_estimator=vtrace", f"output_dir={tmp_path}/o")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "ppo.advantage_estimator: expected one of " in err and all(repr(n) in err for n in ADVANTAGE_ESTIMATORS)
    assert not (tmp_path / "o").exists()


def test_every_statistic_is_reduced_as_declared_and_none_is_dropped():
    class OneProcess:
        num_processes, device = 1, "cpu"

        def gather(self, x):
            return x

    stats = UpdateStats({"loss/policy": "sum", "policy/clipfrac": "mean", "policy/ratio_max": "max",
                         "policy/ratio_clamped": "total"})
    for loss, clipfrac, ratio, share in ((0.25, 0.5, 1.5, 0.75), (0.5, 1.0, 1.2, 0.25)):  # two micro-batches
        stats.add({"loss/policy": torch.tensor(loss), "policy/clipfrac": torch.tensor(clipfrac),
                   "policy/ratio_max": torch.tensor(ratio), "policy/ratio_clamped": torch.tensor(1.0)},
                  torch.tensor(share))
    out = stats.reduce(OneProcess(), updates=1)
    assert out == pytest.approx({"loss/policy": 0.75, "policy/clipfrac": 0.625, "policy/ratio_max": 1.5,
                                 "policy/ratio_clamped": 2.0})
    with pytest.raises(KeyError, match="'policy/new' declares no reduction"):
        stats.add({"policy/new": torch.tensor(1.0)}, torch.tensor(1.0))
