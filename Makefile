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
BASE_MODEL ?=
PRETRAIN_ARGS ?=
SET ?=

.PHONY: all default setup sample prepare vocab pretrain sft eval report status bench test test-core clean-run help export serve setup-integration
# The embedded default: the whole pipeline on the sample inputs, on CPU. `make all` takes raw inputs:
#   make all CORPUS=raw/ SFT_DATA=raw_instructions/ RUN=runs/x
# The pipeline is `zhllama run` (the stage graph is declared in zhllama/stages.py): prepare (clean, dedup, hold out)
# -> vocab -> pretrain -> sft (convert + validate instructions, train, merge) -> eval (bits per character of every
# stage's model) -> RUN/report.md and RUN/report.html. It skips every stage that is up to date; `make vocab`,
# `make pretrain`, ... run that stage and whatever before it is not up to date. `make status` says which is which.
ZHLLAMA = HF_HUB_OFFLINE=1 $(PY) -m zhllama
RUN_OPTS = --run='$(RUN)' --recipe='$(RECIPE)' $(foreach s,$(SET),--set='$(s)') --base-tokenizer='$(BASE_TOKENIZER)' --corpus='$(CORPUS)' \
  --sft-data='$(SFT_DATA)' --sft-prompts='$(SFT_PROMPTS)' --sft-preset='$(SFT_PRESET)' \
  $(foreach v,BASE_MODEL SFT_DTYPE EVAL_TEXT PREPARE_ARGS VOCAB_ARGS PRETRAIN_ARGS SFT_ARGS EVAL_ARGS,\
    $(if $($(v)),--$(subst _,-,$(shell echo $(v) | tr A-Z a-z))='$($(v))'))
# one `zhllama run` at a time per run folder (it locks RUN)
.NOTPARALLEL:
default: all
all: setup sample
	$(ZHLLAMA) run $(RUN_OPTS)

help:
	@echo "targets:"
	@echo "  make | make all | make default   set up .venv, fetch the sample inputs from PyPI, run the whole pipeline"
	@echo "                                   (zhllama run): prepare -> vocab -> pretrain -> sft -> eval -> RUN/report.{md,html};"
	@echo "                                   stages that are up to date are skipped"
	@echo "  make setup        create .venv and install the pinned dependencies (CPU torch)"
	@echo "  make sample       fetch the sample base tokenizer and Chinese text into .cache/zhllama"
	@echo "  make prepare      clean, deduplicate and split raw text (RAW) into RUN/corpus"
	@echo "  make vocab        build the extended tokenizer into RUN/vocab"
	@echo "  make pretrain     resize + phase 1 + phase 2 into RUN/pretrain"
	@echo "  make sft          LoRA SFT + verified merge into RUN/sft/{adapter,merged}, then answers held-out prompts"
	@echo "  make eval         bits per character of base, resized, phase 1, phase 2 and SFT models on EVAL_TEXT into RUN/eval"
	@echo "  make report       greedy answers before/after SFT and RUN/report.{md,html}"
	@echo "                   (each stage target also runs the stages before it that are not up to date)"
	@echo "  make status       which stages of RUN are done, stale or missing, and why (zhllama status RUN)"
	@echo "  make export       GGUF (GGUF_TYPES) of RUN/sft/merged into RUN/gguf, each verified in llama.cpp (needs make setup-integration)"
	@echo "  make serve        OpenAI-compatible API + browser chat for RUN/sft/merged on http://127.0.0.1:PORT"
	@echo "  make setup-integration  build llama-cpp-python from source (~4 min, cached by pip), selenium, llama.cpp's converter,"
	@echo "                   DeepSpeed for CPU (no CUDA ops)"
	@echo "  make bench        CPU benchmarks: tokenizers, generation, pretrain and SFT throughput (vs HF, TRL, LLaMA-Factory), C-Eval scoring time"
	@echo "  make test         core + reference tests (reference tests need ../shared/data or ZHLLAMA_DATA)"
	@echo "  make test-core    core tests only (repository + PyPI)"
	@echo "  make clean-run    delete RUN"
	@echo "  make help         this list"
	@echo "variables (current value):"
	@echo "  RUN=$(RUN)                      run folder every stage writes under"
	@echo "  RECIPE=$(RECIPE)                       recipes/RECIPE.yaml (tiny, llama-7b, llama-13b) or a .yaml path"
	@echo "  SET=$(SET)   recipe overrides for every stage, space-separated SECTION.KEY=VALUE (zhllama run --set)"
	@echo "  BASE_TOKENIZER=$(BASE_TOKENIZER)   the base tokenizer.model (SentencePiece) or tokenizer.json (byte-level: Llama-3, Qwen-2.5)"
	@echo "  BASE_MODEL=$(BASE_MODEL)                      HF base model folder (empty: the recipe's random tiny model)"
	@echo "  CORPUS=$(CORPUS)              Chinese text (files or folders); make all prepares it first"
	@echo "  RAW=$(RAW)                 raw text for make prepare (default: CORPUS)"
	@echo "  SFT_DATA=$(SFT_DATA)   instructions (Alpaca, BELLE, pCLUE, ShareGPT)"
	@echo "  SFT_PROMPTS=$(SFT_PROMPTS)   held-out instructions answered after SFT"
	@echo "  SFT_PRESET=$(SFT_PRESET)   decoding preset of those answers;  SFT_DTYPE=$(SFT_DTYPE)   dtype of the merged model (empty: float32 for tiny recipes, else float16)"
	@echo "  EVAL_TEXT=$(EVAL_TEXT)   held-out text of make eval (empty: RUN/corpus/heldout);  EVAL_ARGS=$(EVAL_ARGS)"
	@echo "  GGUF_TYPES=$(GGUF_TYPES)   GGUF types of make export;  PORT=$(PORT)  SERVE_ARGS=$(SERVE_ARGS)   make serve"
	@echo "  LLAMA_SRC=$(LLAMA_SRC)   llama.cpp's converter (make setup-integration)"
	@echo "  VOCAB_ARGS=$(VOCAB_ARGS)  PRETRAIN_ARGS=$(PRETRAIN_ARGS)  SFT_ARGS=$(SFT_ARGS)  PREPARE_ARGS=$(PREPARE_ARGS)"
	@echo "                    extra flags for each stage, e.g. PRETRAIN_ARGS=\"--set pretrain.phase1.max_steps=10\""
	@echo "  PYTHON=$(PYTHON)   interpreter that creates .venv;  VENV=$(VENV)   the virtual environment"

setup: $(VENV)/.installed

# torch first and pinned: the CPU wheel, never a CUDA build pulled in by another package
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m zhllama.build_log --label setup --log $(SAMPLE)/logs/setup-pip.log -- $(PY) -m pip install --upgrade pip
	@# pip's and setuptools' own notices go to the log (shown when the install fails), not into every make log
	$(PY) -m zhllama.build_log --label setup --log $(SAMPLE)/logs/setup.log -- $(PY) -m pip install torch==2.13.0
	$(PY) -m zhllama.build_log --label setup --log $(SAMPLE)/logs/setup.log -- $(PY) -m pip install torch==2.13.0 -e '.[test]'
	touch $@

sample: $(SAMPLE)/base/tokenizer.model
$(SAMPLE)/base/tokenizer.model: | setup
	$(PY) -m corpora.sample

# The stages: thin aliases of `zhllama run STAGE` (each also runs what before it is not up to date).
SFT_DATA ?= corpora/instructions_zh.json
SFT_PROMPTS ?= corpora/instructions_zh_heldout.txt
SFT_ARGS ?=
SFT_PRESET ?= greedy
SFT_DTYPE ?=
EVAL_TEXT ?=
EVAL_ARGS ?=
vocab pretrain sft eval report: | setup
	$(ZHLLAMA) run $@ $(RUN_OPTS)

status: | setup
	@$(ZHLLAMA) status $(RUN)

# CPU benchmarks (print tables, write bench/results/*.json); bench/RESULTS.md keeps the figures we quote.
.PHONY: bench
# The SFT benchmark installs TRL and LLaMA-Factory into their own venvs under .cache/zhllama/bench-venvs on first use.
bench: setup sample
	$(ZHLLAMA) run vocab $(RUN_OPTS)
	-$(PY) bench/tokenizers.py
	$(PY) bench/generation.py --tokenizer $(RUN)/vocab --text $(RUN)/corpus/heldout
	$(PY) bench/pretrain_throughput.py --tokenizer $(RUN)/vocab
	$(PY) bench/choice_speed.py --tokenizer $(RUN)/vocab --text $(RUN)/corpus/heldout --subjects 2
	$(PY) bench/sft_throughput.py
	$(PY) bench/gpu/shapes.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-core: setup
	HF_HUB_OFFLINE=1 ZHLLAMA_DATA=/nonexistent $(PY) -m pytest -q -m "not reference"

clean-run:
	rm -rf $(RUN)

# Raw text (files/folders: .txt .jsonl .json .parquet, plain or .gz, UTF-8/GB18030/Big5) -> cleaned,
# deduplicated shards in $(RUN)/corpus/{train,heldout}.
RAW ?= $(CORPUS)
PREPARE_ARGS ?=
prepare: | setup
	$(ZHLLAMA) run prepare $(RUN_OPTS) --corpus='$(RAW)'

# Use the model: GGUF files for llama.cpp (verified against sentencepiece and transformers) and a local server.
# The merged folder written before chat templates travelled gets its chat_template.jinja first (idempotent).
GGUF_TYPES ?= f16 q8_0
PORT ?= 8000
SERVE_ARGS ?=
# Both only read RUN/sft/merged (they never re-run the pipeline): run `make` (or `make sft`) first.
MERGED_READY = test -f $(RUN)/sft/merged/config.json || { echo "$(RUN)/sft/merged: no merged model; run make (or make sft) first" >&2; exit 2; }
export: | setup
	@$(MERGED_READY)
	@mkdir -p $(RUN)/gguf
	HF_HUB_OFFLINE=1 $(PY) -m deploy template --model $(RUN)/sft/merged
	set -e; for t in $(GGUF_TYPES); do \
	  HF_HUB_OFFLINE=1 $(PY) -m deploy gguf --model $(RUN)/sft/merged --out $(RUN)/gguf/model-$$t.gguf --type $$t --verify; \
	done
serve: | setup
	@$(MERGED_READY)
	HF_HUB_OFFLINE=1 $(PY) -m deploy template --model $(RUN)/sft/merged
	HF_HUB_OFFLINE=1 $(PY) -m deploy serve --model $(RUN)/sft/merged --port $(PORT) $(SERVE_ARGS)

# The integration tier's tools: llama.cpp from PyPI's source distribution (native CPU tuning off: with it the
# build crashed with SIGILL on some machines; pip caches the built wheel, so only the first run compiles) and
# selenium. The browser tests also need Debian's chromium and chromium-driver (apt-get, see .ci/run).
# llama.cpp's own converter (convert_hf_to_gguf.py + its gguf-py) is taken from the same source distribution
# into $(LLAMA_SRC); the tests convert the merged layout with it and compare with `deploy gguf`.
LLAMA_SRC ?= $(SAMPLE)/llama.cpp-src
setup-integration: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(PY) -m zhllama.build_log --label llama-cpp-python \
	  --log $(SAMPLE)/logs/setup-integration.log -- $(PY) -m pip install -v torch==2.13.0 -e '.[test,integration]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation torch==2.13.0 -e '.[deepspeed]'
	test -f $(LLAMA_SRC)/convert_hf_to_gguf.py || { \
	  $(PY) -m pip download -q --no-deps --no-binary :all: -d $(SAMPLE)/sdist llama-cpp-python==0.3.36 && \
	  $(PY) -c "import sys, tarfile, pathlib; t = tarfile.open(sys.argv[1]); d = pathlib.Path(sys.argv[2]); \
	    keep = ('convert_hf_to_gguf.py', 'conversion/', 'gguf-py/', 'LICENSE'); \
	    ms = [m for m in t.getmembers() if '/vendor/llama.cpp/' in m.name and m.name.split('/vendor/llama.cpp/', 1)[1].startswith(keep)]; \
	    [setattr(m, 'name', m.name.split('/vendor/llama.cpp/', 1)[1]) for m in ms]; t.extractall(d, members=ms, filter='data')" \
	    $(SAMPLE)/sdist/llama_cpp_python-0.3.36.tar.gz $(LLAMA_SRC); }
