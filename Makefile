# distgrow's tasks. Every target sets itself up first (scripts/bootstrap.sh is quick when done).
.PHONY: setup demo check test lint format bench gpu-check clean

VENV ?= .venv
BIN := $(VENV)/bin

setup:
	bash scripts/bootstrap.sh

# The main job on its embedded default: a real comparison run on CPU (scripts/demo.sh).
demo: setup
	bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check distgrow tests benchmarks examples
	$(BIN)/ruff format --check distgrow tests benchmarks examples
	$(BIN)/mypy

# The fast tier, while you work: lint, types and the unit tests (no test that starts a process;
# about a minute of tests on 2 cores). `make test` runs them all.
check: lint
	$(BIN)/pytest -q -m "not integration and not slow"

# What CI runs (.ci/run): lint, types, then every test tier that can run on this machine.
test: lint
	$(BIN)/pytest

format: setup
	$(BIN)/ruff format distgrow tests benchmarks examples
	$(BIN)/ruff check --fix distgrow tests benchmarks examples

# Real runs on this machine: resize latency of `distgrow launch` (docs/launch.md has the numbers).
bench: setup
	$(BIN)/python benchmarks/resize_latency.py --reps 3 --json runs/bench/resize_latency.json

# On a machine with a GPU: the gpu test tier, syncs per update, a real OOM fallback, DDP and
# DeepSpeed on CUDA, the Fashion-MNIST compare's wall-clock; one table (scripts/gpu_check.py).
gpu-check: setup
	bash scripts/gpu_check.sh

clean:
	rm -rf runs/demo .pytest_cache .mypy_cache .ruff_cache
