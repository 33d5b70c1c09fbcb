"""Recipe loading and validation: shipped recipes, override typing, one-line errors, derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import apply_overrides, build, describe
from rlhf.errors import RecipeError
from rlhf.recipes import RECIPES, SFTRecipe, derived, load_recipe
from tests.conftest import ROOT, write_yaml

SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def sft_dict(**changes) -> dict:
    data = {"stage": "sft", "output_dir": "out", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
            "train": {"batch_size": 8, "micro_batch_size": 4}}
    for key, value in changes.items():
        apply_overrides(data, [f"{key}={value}"])
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.stage in RECIPES
    assert recipe.output_dir


def test_shipped_recipes_exist_for_every_stage():
    stages = {load_recipe(p).stage for p in SHIPPED if p.parent.name == "tiny"}
    assert stages == set(RECIPES)


def test_defaults_and_yaml_float_spelling(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field accepts it
    path = write_yaml(tmp_path / "r.yaml", {**sft_dict(), "train": {"lr": "1e-4", "batch_size": 8,
                                                                     "micro_batch_size": 4}})
    recipe = load_recipe(path)
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.lora.r == 8 and recipe.lora.target_modules == "all-linear"
    assert recipe.seed == 0 and recipe.resume is None


def test_override_types_are_checked(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", sft_dict())
    recipe = load_recipe(path, "sft", ["train.lr=3e-4", "lora.r=4", "lora.target_modules=[q_proj, v_proj]",
                                       "lora=null", "data.packing=true"])
    assert recipe.train.lr == pytest.approx(3e-4) and recipe.lora is None and recipe.data.packing is True
    with pytest.raises(RecipeError) as err:
        load_recipe(path, "sft", ["train.lr=abc"])
    assert err.value.line() == "error: command line: train.lr: expected a number, got 'abc'"
    with pytest.raises(RecipeError) as err:
        load_recipe(path, "sft", ["train.micro_batch_size=2.5"])
    assert "train.micro_batch_size: expected an integer" in err.value.line()
    with pytest.raises(RecipeError) as err:
        load_recipe(path, "sft", ["data.packing=yes please"])
    assert "data.packing: expected true or false" in err.value.line()


@pytest.mark.parametrize("change, message", [
    ({"train.lrr": "1"}, "train.lrr: unknown key (did you mean 'lr'?)"),
    ({"train.lr": "-1"}, "train.lr: must be greater than 0, got -1"),
    ({"train.batch_size": "0"}, "train.batch_size: must be greater than 0, got 0"),
    ({"train.micro_batch_size": "-4"}, "train.micro_batch_size: must be greater than 0, got -4"),
    ({"lora.r": "0"}, "lora.r: must be greater than 0, got 0"),
    ({"train.scheduler": "cosin"}, "train.scheduler: expected one of 'cosine', 'linear', 'constant', got 'cosin'"),
    ({"train.batch_size": "10"}, "train.batch_size: 10 is not a multiple of micro_batch_size 4 x 1 process(es) = 4"),
    ({"train.adam_betas": "[0.9]"}, "train.adam_betas: expected two numbers in [0, 1), got [0.9]"),
    # non-finite numbers pass every bound check (inf > 0) and then poison the run
    ({"train.lr": ".inf"}, "train.lr: must be a finite number, got inf"),
    ({"train.lr": ".nan"}, "train.lr: must be a finite number, got nan"),
    ({"train.lr": "nan"}, "train.lr: must be a finite number, got 'nan'"),
    ({"train.lr": "1e999"}, "train.lr: must be a finite number, got '1e999'"),
    ({"train.max_grad_norm": "-.inf"}, "train.max_grad_norm: must be a finite number, got -inf"),
    ({"train.adam_betas": "[0.9, .nan]"}, "train.adam_betas[1]: must be a finite number, got nan"),
    ({"data.max_len": "64", "data.max_prompt_len": "64"},
     "data.max_prompt_len: must be less than max_len (64) so that a response fits after the prompt, got 64"),
])
def test_bad_values_name_the_key(tmp_path, change, message):
    path = write_yaml(tmp_path / "r.yaml", sft_dict(**change))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line() == f"error: {path}: {message}"


def stage_dict(stage: str, **changes) -> dict:
    """A minimal valid recipe of `stage` with dotted `changes` applied."""
    sections = {
        "dpo": {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                "train": {"batch_size": 8, "micro_batch_size": 4}},
        "rm": {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
               "train": {"batch_size": 8, "micro_batch_size": 4}},
        "tasks": {},
    }
    data = {"stage": stage, "output_dir": "out", **sections[stage]}
    for key, value in changes.items():
        apply_overrides(data, [f"{key}={value}"])
    return data


@pytest.mark.parametrize("stage, change, message", [
    ("dpo", {"dpo.loss_type": "ipo", "dpo.label_smoothing": "0.1"},
     "dpo.label_smoothing: applies to loss_type 'sigmoid' only (conservative DPO); set it to 0 for 'ipo'"),
    ("rm", {"data.max_len": "128", "data.max_prompt_len": "200"},
     "data.max_prompt_len: must be less than max_len (128) so that a response fits after the prompt, got 200"),
    ("tasks", {"tasks.alphabet": "a"}, "tasks.alphabet: expected at least 2 distinct letters, got 'a'"),
    ("tasks", {"tasks.alphabet": "aaaa"}, "tasks.alphabet: expected at least 2 distinct letters, got 'aaaa'"),
    ("tasks", {"tasks.alphabet": "''"}, "tasks.alphabet: expected at least 2 distinct letters, got ''"),
    ("tasks", {"tasks.alphabet": "abZ"}, "tasks.alphabet: expected lowercase ASCII letters a-z only, got 'Z'"),
    ("tasks", {"tasks.alphabet": "'ab1 '"}, "tasks.alphabet: expected lowercase ASCII letters a-z only, got ' 1'"),
    ("tasks", {"tasks.families": "[]"}, "tasks.families: expected names from reverse, sort, upper, max, count"),
    ("tasks", {"tasks.families": "[reverse, nope]"}, "tasks.families: expected names from"),
])
def test_section_checks_name_the_key(tmp_path, stage, change, message):
    path = write_yaml(tmp_path / "r.yaml", stage_dict(stage, **change))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.line().startswith(f"error: {path}: {message}"), err.value.line()
    # the same value given on the command line names the command line
    with pytest.raises(RecipeError) as err:
        load_recipe(write_yaml(tmp_path / "ok.yaml", stage_dict(stage)), stage, [f"{k}={v}" for k, v in change.items()])
    assert err.value.line().startswith(f"error: command line: {message}"), err.value.line()


def test_valid_section_values_still_load(tmp_path):
    dpo = load_recipe(write_yaml(tmp_path / "d.yaml", stage_dict("dpo", **{"dpo.loss_type": "ipo"})))
    assert dpo.dpo.loss_type == "ipo" and dpo.dpo.label_smoothing == 0.0
    assert load_recipe(write_yaml(tmp_path / "s.yaml", stage_dict("dpo", **{"dpo.label_smoothing": "0.1"}))) \
        .dpo.label_smoothing == pytest.approx(0.1)
    tasks = load_recipe(write_yaml(tmp_path / "t.yaml", stage_dict("tasks", **{"tasks.alphabet": "ab"})))
    assert tasks.tasks.alphabet == "ab"
    sft = load_recipe(write_yaml(tmp_path / "f.yaml", sft_dict(**{"data.max_len": "64",
                                                                   "data.max_prompt_len": "63"})))
    assert sft.data.max_prompt_len == 63
    assert load_recipe(write_yaml(tmp_path / "g.yaml", sft_dict())).data.max_prompt_len is None


def test_stage_must_be_a_stage_name(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {**sft_dict(), "stage": ["sft"]})
    for stage in (None, "sft"):  # `rlhf check` (stage from the file) and `rlhf sft`
        with pytest.raises(RecipeError) as err:
            load_recipe(path, stage)
        assert err.value.line().startswith(f"error: {path}: stage: expected one of tasks, pretrain, sft"), \
            err.value.line()
    path = write_yaml(tmp_path / "m.yaml", {**sft_dict(), "stage": {"name": "sft"}})
    with pytest.raises(RecipeError, match="stage: expected one of"):
        load_recipe(path)


@pytest.mark.parametrize("override", ["stage=rm", "stage=[sft]", "stage=null"])
def test_overrides_cannot_change_the_stage(tmp_path, override):
    path = write_yaml(tmp_path / "r.yaml", sft_dict())
    for stage in (None, "sft"):
        with pytest.raises(RecipeError) as err:
            load_recipe(path, stage, [override])
        assert err.value.line().startswith("error: command line: stage: an override cannot change the stage of a "
                                           "'sft' recipe"), err.value.line()
    assert load_recipe(path, "sft", ["stage=sft"]).stage == "sft"  # restating it is harmless


def test_missing_required_value_and_wrong_stage(tmp_path):
    data = sft_dict()
    del data["model"]
    path = write_yaml(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError, match=r"r.yaml: model: missing required value"):
        load_recipe(path)
    path = write_yaml(tmp_path / "s.yaml", sft_dict())
    with pytest.raises(RecipeError, match="this recipe is for 'sft', not 'rm'"):
        load_recipe(path, "rm")


def test_derived_batch_figures(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", sft_dict(**{"train.batch_size": "16", "train.micro_batch_size": "4"}))
    assert derived(load_recipe(path), processes=1)["grad_accum"] == 4
    recipe = load_recipe(path, processes=2)
    assert derived(recipe, processes=2) == {"processes": 2, "micro_batch_size": 4, "grad_accum": 2,
                                            "effective_batch_size": 16}
    with pytest.raises(RecipeError, match="not a multiple of micro_batch_size 4 x 3 process"):
        load_recipe(path, processes=3)


def test_build_rejects_non_mapping_section():
    with pytest.raises(RecipeError, match="train: expected a mapping"):
        build(SFTRecipe, {**sft_dict(), "train": [1, 2]}, "f.yaml")


def test_describe_lists_every_key_with_help():
    lines = describe(SFTRecipe)
    assert any(line.strip().startswith("train.lr = 0.0002") and "peak learning rate" in line for line in lines)
    assert any("lora.target_modules" in line for line in lines)


# --- the CLI: one line on stderr, exit code 2, no traceback --------------------------------------------


def test_cli_recipe_errors_are_one_line(tmp_path, capsys):
    path = write_yaml(tmp_path / "r.yaml", sft_dict(**{"train.lrr": "1"}))
    assert main(["sft", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: train.lrr: unknown key (did you mean 'lr'?)"]
    assert main(["sft", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"
    (tmp_path / "bad.yaml").write_text("stage: sft\nmodel: [unclosed\n")
    assert main(["sft", str(tmp_path / "bad.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'bad.yaml'}:")
    assert main(["sft", str(path), "no_equals_sign"]) == 2
    assert "not of the form key=value" in capsys.readouterr().err


@pytest.mark.parametrize("content, override, expected", [
    ("stage: [sft]\noutput_dir: o\n", None, "{p}: stage: expected one of tasks, pretrain, sft"),
    ("stage: sft\noutput_dir: o\nmodel: {{name_or_path: m}}\ndata: {{train: t.jsonl}}\n", "stage=rm",
     "command line: stage: an override cannot change the stage of a 'sft' recipe"),
    ("stage: sft\noutput_dir: o\nmodel: {{name_or_path: m}}\ndata: {{train: t.jsonl}}\ntrain: {{lr: .inf}}\n",
     None, "{p}: train.lr: must be a finite number, got inf"),
    ("stage: sft\noutput_dir: o\nmodel: {{name_or_path: m}}\ndata: {{train: t.jsonl}}\n", "train.lr=inf",
     "command line: train.lr: must be a finite number, got 'inf'"),
])
def test_cli_stage_and_number_errors_are_one_line(tmp_path, capsys, content, override, expected):
    path = tmp_path / "r.yaml"
    path.write_text(content.format())
    for argv in (["check", str(path)], ["sft", str(path)]):
        assert main(argv + ([override] if override else [])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: " + expected.format(p=path)), err


def test_cli_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "export", "eval", "check", "plan", "report"):
        assert f"  {stage}" in out
    assert main(["ppo", "--help"]) == 0
    assert "ppo.kl_estimator" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_the_recipe_reference_in_docs_is_current():
    """docs/recipes.md is generated from the recipe classes; regenerate it with `make docs` after a change."""
    from rlhf.cli import reference

    assert (ROOT / "docs" / "recipes.md").read_text() == reference() + "\n", "run `make docs`"


def ppo_dict(**changes) -> dict:
    data = {"stage": "ppo", "output_dir": "out", "model": {"name_or_path": "m"}, "data": {"train": "p.jsonl"},
            "train": {"batch_size": 8, "micro_batch_size": 4}, "ppo": {"reward_model": "rm"}}
    for key, value in changes.items():
        apply_overrides(data, [f"{key}={value}"])
    return data


@pytest.mark.parametrize("old, new", [("kl_target", "kl_budget"), ("target_kl", "early_stop_kl")])
def test_renamed_ppo_keys_name_the_new_key(tmp_path, capsys, old, new):
    path = write_yaml(tmp_path / "r.yaml", ppo_dict(**{f"ppo.{old}": "0.5"}))
    assert main(["ppo", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {path}: ppo.{old}: renamed to 'ppo.{new}'"]
    assert getattr(load_recipe(write_yaml(tmp_path / "n.yaml", ppo_dict(**{f"ppo.{new}": "0.5"}))).ppo, new) == 0.5


def test_greedy_ppo_is_refused_at_load(tmp_path, capsys):
    path = write_yaml(tmp_path / "r.yaml", ppo_dict(**{"generate.temperature": "0"}))
    assert main(["ppo", str(path)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"error: {path}: generate.temperature: PPO needs sampled rollouts")
    assert main(["ppo", str(write_yaml(tmp_path / "ok.yaml", ppo_dict())), "generate.temperature=0.0"]) == 2
    assert capsys.readouterr().err.startswith("error: command line: generate.temperature:")
    load_recipe(write_yaml(tmp_path / "sft.yaml", sft_dict(**{"generate.temperature": "0"})))  # greedy samples: fine
