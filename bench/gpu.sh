#!/usr/bin/env bash
# Every GPU benchmark in one call, in under 9 minutes on one H100: SFT (LoRA, full), RM and DPO (live and
# precomputed reference) against TRL at 270m and 1b; GRPO, RLOO and PPO (gae) against TRL's GRPO/RLOO
# trainers, our PPO phases, and the rollout engines against the decode bandwidth bound at 270m; the
# logits-memory table (bench/logprobs.py) when it is in the tree. JSON and Markdown go to OUT_DIR.
#
#   bash bench/gpu.sh OUT_DIR              # on the GPU machine, from the repository root
#   CPU=1 bash bench/gpu.sh OUT_DIR        # smoke run here: the tiny sizes on the CPU, a couple of minutes
#   bash bench/gpu.sh --dry-run OUT_DIR    # the same as CPU=1
#
# trl and datasets: when python3 cannot import them and .whl/ holds wheels (made here by
# ../shared/device/prepare-wheels.sh, carried to the GPU machine), they are installed into /tmp/site first.
set -euo pipefail
if [[ "${1:-}" == "--dry-run" ]]; then CPU=1; shift; fi
out=${1:?usage: bench/gpu.sh [--dry-run] OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then py=.venv/bin/python; fi

if ! "$py" -c "import trl, datasets" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "trl/datasets missing and no .whl/ here: run bash ../shared/device/prepare-wheels.sh first" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

started=$(date +%s)
{
  echo "# bench/gpu.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
  "$py" - <<'EOF'
import torch, transformers, trl, peft
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
print(f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"peft {peft.__version__}")
EOF
} > "$out/summary.md"

if [[ -n "${CPU:-}" ]]; then
  # smoke run: tiny sizes on the CPU, every script end to end
  "$py" bench/suite.py --tiny --out "$out/work" --json "$out/suite.json" --markdown "$out/suite.md"
else
  # iteration counts chosen for < 9 minutes on one H100 (each measurement is its own process, ~10 s to start)
  "$py" bench/suite.py --sizes 270m,1b --ppo-size 270m --steps 10 --out "$out/work" --json "$out/suite.json" \
    --markdown "$out/suite.md"
fi
cat "$out/suite.md" >> "$out/summary.md"

if [[ -f bench/logprobs.py ]]; then
  { echo; echo "## logits memory (bench/logprobs.py)"; } >> "$out/summary.md"
  if [[ -n "${CPU:-}" ]]; then "$py" bench/logprobs.py --tiny >> "$out/summary.md"
  else "$py" bench/logprobs.py >> "$out/summary.md"; fi
else
  { echo; echo "bench/logprobs.py is not in this tree: no logits-memory table."; } >> "$out/summary.md"
fi
echo "$(( $(date +%s) - started )) s in all" >> "$out/summary.md"
rm -rf "$out/work"
cat "$out/summary.md"
