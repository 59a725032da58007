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

.PHONY: all default setup sample vocab pretrain sft eval report bench test test-core clean-run help FORCE export serve setup-integration
# The embedded default: the whole pipeline on the sample inputs, on CPU. `make all` takes raw inputs:
#   make all CORPUS=raw/ SFT_DATA=raw_instructions/ RUN=runs/x
# prepare (clean, dedup, hold out) -> vocab -> pretrain -> sft (convert + validate instructions, train, merge)
# -> eval (bits per character of every stage's model) -> RUN/report.md and RUN/report.html.
# Every stage skips what is up to date with its inputs.
default: all
all: setup sample
	@mkdir -p $(RUN)/report; set -e; now() { date +%s; }; t0=$$(now); \
	$(MAKE) --no-print-directory prepare RAW="$(CORPUS)"; t1=$$(now); \
	$(MAKE) --no-print-directory vocab CORPUS=$(RUN)/corpus/train; t2=$$(now); \
	$(MAKE) --no-print-directory pretrain CORPUS=$(RUN)/corpus/train; t3=$$(now); \
	$(MAKE) --no-print-directory sft CORPUS=$(RUN)/corpus/train; t4=$$(now); \
	$(MAKE) --no-print-directory eval CORPUS=$(RUN)/corpus/train; t5=$$(now); \
	printf '{"prepare": %d, "vocab": %d, "pretrain": %d, "sft (convert, train, merge, answers)": %d, "eval (bits per character)": %d, "total": %d}\n' \
	  $$((t1-t0)) $$((t2-t1)) $$((t3-t2)) $$((t4-t3)) $$((t5-t4)) $$((t5-t0)) > $(RUN)/report/timings.json; \
	$(MAKE) --no-print-directory report

help:
	@echo "targets:"
	@echo "  make | make all | make default   set up .venv, fetch the sample inputs from PyPI, run the whole pipeline:"
	@echo "                                   prepare -> vocab -> pretrain -> sft -> merge -> RUN/report.{md,html}"
	@echo "  make setup        create .venv and install the pinned dependencies (CPU torch)"
	@echo "  make sample       fetch the sample base tokenizer and Chinese text into .cache/zhllama"
	@echo "  make prepare      clean, deduplicate and split raw text (RAW) into RUN/corpus"
	@echo "  make vocab        build the extended tokenizer into RUN/vocab"
	@echo "  make pretrain     resize + phase 1 + phase 2 into RUN/pretrain (needs make vocab)"
	@echo "  make sft          LoRA SFT + verified merge into RUN/sft/{adapter,merged}, then answers held-out prompts"
	@echo "  make eval         bits per character of base, resized, phase 1, phase 2 and SFT models on EVAL_TEXT into RUN/eval"
	@echo "  make report       greedy answers before/after SFT and RUN/report.{md,html}"
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
	@echo "  BASE_TOKENIZER=$(BASE_TOKENIZER)   the base tokenizer.model (SentencePiece) or tokenizer.json (byte-level: Llama-3, Qwen-2.5)"
	@echo "  BASE_MODEL=$(BASE_MODEL)                      HF base model folder (empty: the recipe's random tiny model)"
	@echo "  CORPUS=$(CORPUS)              Chinese text (files or folders); make all prepares it first"
	@echo "  RAW=$(RAW)                 raw text for make prepare (default: CORPUS)"
	@echo "  SFT_DATA=$(SFT_DATA)   instructions (Alpaca, BELLE, pCLUE, ShareGPT)"
	@echo "  SFT_PROMPTS=$(SFT_PROMPTS)   held-out instructions answered after SFT"
	@echo "  SFT_PRESET=$(SFT_PRESET)   decoding preset of those answers;  SFT_DTYPE=$(SFT_DTYPE)   dtype of the merged model"
	@echo "  EVAL_TEXT=$(EVAL_TEXT)   held-out text of make eval;  EVAL_ARGS=$(EVAL_ARGS)"
	@echo "  GGUF_TYPES=$(GGUF_TYPES)   GGUF types of make export;  PORT=$(PORT)  SERVE_ARGS=$(SERVE_ARGS)   make serve"
	@echo "  LLAMA_SRC=$(LLAMA_SRC)   llama.cpp's converter (make setup-integration)"
	@echo "  VOCAB_ARGS=$(VOCAB_ARGS)  PRETRAIN_ARGS=$(PRETRAIN_ARGS)  SFT_ARGS=$(SFT_ARGS)  PREPARE_ARGS=$(PREPARE_ARGS)"
	@echo "                    extra flags for each stage, e.g. PRETRAIN_ARGS=\"--set pretrain.phase1.max_steps=10\""
	@echo "  PYTHON=$(PYTHON)   interpreter that creates .venv;  VENV=$(VENV)   the virtual environment"

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
# An unchanged folder keeps its timestamps, so later stages are not redone needlessly.
vocab: $(RUN)/vocab/tokenizer.json
$(RUN)/vocab/tokenizer.json: $(BASE_TOKENIZER) FORCE | setup
	HF_HUB_OFFLINE=1 $(PY) -m vocab build --recipe $(RECIPE) --base $(BASE_TOKENIZER) --corpus $(CORPUS) --out $(RUN)/vocab $(VOCAB_ARGS)
FORCE:

# Continued pretraining: resize -> phase 1 (embeddings) -> phase 2 (LoRA + embed/head) into $(RUN)/pretrain.
# Empty BASE_MODEL: the recipe (tiny) builds a small random model on the base tokenizer. Recipes whose
# phase 1 is disabled (llama-13b) run phase 2 on the resized model. Rerunning resumes from checkpoints.
PRETRAIN_BASE := $(if $(BASE_MODEL),$(BASE_MODEL),$(RUN)/pretrain/base)
pretrain: $(RUN)/pretrain/phase2/adapter_model.safetensors
$(RUN)/pretrain/base/config.json: $(BASE_TOKENIZER) | setup
	HF_HUB_OFFLINE=1 $(PY) -m pretrain init --recipe $(RECIPE) --tokenizer $(BASE_TOKENIZER) --out $(RUN)/pretrain/base
$(RUN)/pretrain/resized/config.json: $(RUN)/vocab/tokenizer.json $(if $(BASE_MODEL),,$(RUN)/pretrain/base/config.json) | setup
	HF_HUB_OFFLINE=1 $(PY) -m pretrain resize --model $(PRETRAIN_BASE) --tokenizer $(RUN)/vocab --out $(RUN)/pretrain/resized
# The corpus files' timestamps make phase 1 and 2 rerun when the text changes; the stage itself then
# sees different input hashes and starts over instead of continuing stale checkpoints.
CORPUS_FILES = $(shell find $(CORPUS) -type f 2>/dev/null)
$(RUN)/pretrain/phase1/config.json: $(RUN)/pretrain/resized/config.json $(CORPUS_FILES)
	if HF_HUB_OFFLINE=1 $(PY) -c "import sys; from zhllama.recipe import load_recipe; sys.exit(0 if load_recipe('$(RECIPE)').pretrain.phase1.enabled else 1)"; then \
	  HF_HUB_OFFLINE=1 $(PY) -m pretrain phase1 --recipe $(RECIPE) --model $(RUN)/pretrain/resized --corpus $(CORPUS) --out $(RUN)/pretrain/phase1 --restart-if-changed $(PRETRAIN_ARGS); \
	else mkdir -p $(RUN)/pretrain/phase1 && cp $(RUN)/pretrain/resized/config.json $(RUN)/pretrain/phase1/config.json && echo skipped > $(RUN)/pretrain/phase1/SKIPPED; fi
$(RUN)/pretrain/phase2/adapter_model.safetensors: $(RUN)/pretrain/phase1/config.json $(CORPUS_FILES)
	HF_HUB_OFFLINE=1 $(PY) -m pretrain phase2 --recipe $(RECIPE) --corpus $(CORPUS) --out $(RUN)/pretrain/phase2 --restart-if-changed $(PRETRAIN_ARGS) \
	  --model $$(test -f $(RUN)/pretrain/phase1/SKIPPED && echo $(RUN)/pretrain/resized || echo $(RUN)/pretrain/phase1)

# Instruction tuning: LoRA SFT on the pretrain stage's model (phase 1 + phase-2 adapter), merge the phase-2
# and SFT adapters (verified by logits), then answer a few held-out Chinese instructions.
SFT_DATA ?= corpora/instructions_zh.json
SFT_PROMPTS ?= corpora/instructions_zh_heldout.txt
SFT_ARGS ?=
SFT_PRESET ?= greedy
SFT_DTYPE ?= $(if $(filter tiny llama3-tiny,$(RECIPE)),float32,float16)
SFT_BASE = $$(test -f $(RUN)/pretrain/phase1/SKIPPED && echo $(RUN)/pretrain/resized || echo $(RUN)/pretrain/phase1)
sft: $(RUN)/sft/merged/config.json
	HF_HUB_OFFLINE=1 $(PY) -m sft generate --model $(RUN)/sft/merged --prompts-file $(SFT_PROMPTS) --preset $(SFT_PRESET) --max-new-tokens 48
# Any supported format (Alpaca, BELLE, pCLUE, ShareGPT) becomes one validated Alpaca file first.
$(RUN)/sft/data.json: $(SFT_DATA) | setup
	@mkdir -p $(RUN)/sft
	$(PY) -m corpora instructions --input $(SFT_DATA) --out $@
$(RUN)/sft/adapter/adapter_model.safetensors: $(RUN)/pretrain/phase2/adapter_model.safetensors $(RUN)/sft/data.json | setup
	HF_HUB_OFFLINE=1 $(PY) -m sft train --recipe $(RECIPE) --model $(SFT_BASE) --adapter $(RUN)/pretrain/phase2 \
	  --data $(RUN)/sft/data.json --out $(RUN)/sft/adapter --restart-if-changed $(SFT_ARGS)
$(RUN)/sft/merged/config.json: $(RUN)/sft/adapter/adapter_model.safetensors
	HF_HUB_OFFLINE=1 $(PY) -m sft merge --base $(SFT_BASE) --adapter $(RUN)/pretrain/phase2 --adapter $(RUN)/sft/adapter \
	  --out $(RUN)/sft/merged --dtype $(SFT_DTYPE)

# Bits per character of every stage's model on the held-out split, each with its own tokenizer (the base
# model with the base tokenizer): RUN/eval/bpc.{json,png}, shown in the report. Redone when a model or the text changes.
EVAL_TEXT ?= $(RUN)/corpus/heldout
EVAL_ARGS ?=
EVAL_TEXT_FILES = $(shell find $(EVAL_TEXT) -type f 2>/dev/null)
eval: $(RUN)/eval/bpc.json
$(RUN)/eval/bpc.json: $(RUN)/sft/merged/config.json $(EVAL_TEXT_FILES) | setup
	@mkdir -p $(RUN)/eval
	HF_HUB_OFFLINE=1 $(PY) -m evaluation bpc --model $(PRETRAIN_BASE) --label base --model $(RUN)/pretrain/resized --label resized \
	  $$(test -f $(RUN)/pretrain/phase1/SKIPPED || echo --model $(RUN)/pretrain/phase1 --label phase1) \
	  --model $(SFT_BASE) --adapter $(RUN)/pretrain/phase2 --label phase2 --model $(RUN)/sft/merged --label sft-merged \
	  --text $(EVAL_TEXT) --json $@ --chart $(RUN)/eval/bpc.png --no-progress $(EVAL_ARGS)

# Greedy answers to the held-out instructions before SFT (pretrained model) and after (merged), then the report.
report: | setup
	@mkdir -p $(RUN)/report
	HF_HUB_OFFLINE=1 $(PY) -m sft generate --model $(RUN)/pretrain/phase2 --base $(SFT_BASE) --prompts-file $(SFT_PROMPTS) \
	  --preset greedy --max-new-tokens 48 --json > $(RUN)/report/generations_before.json
	HF_HUB_OFFLINE=1 $(PY) -m sft generate --model $(RUN)/sft/merged --prompts-file $(SFT_PROMPTS) \
	  --preset greedy --max-new-tokens 48 --json > $(RUN)/report/generations_after.json
	$(PY) -m zhllama.run_report --run $(RUN)

# CPU benchmarks (print tables, write bench/results/*.json); bench/RESULTS.md keeps the figures we quote.
.PHONY: bench
# The SFT benchmark installs TRL and LLaMA-Factory into their own venvs under .cache/zhllama/bench-venvs on first use.
bench: setup sample
	@$(MAKE) --no-print-directory prepare RAW="$(CORPUS)"
	@$(MAKE) --no-print-directory vocab CORPUS=$(RUN)/corpus/train
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
# deduplicated shards in $(RUN)/corpus/{train,heldout}. Always invoked: prepare resumes and skips finished work.
RAW ?= $(CORPUS)
PREPARE_ARGS ?=
.PHONY: prepare
prepare: | setup
	$(PY) -m corpora prepare --input $(RAW) --out $(RUN)/corpus $(PREPARE_ARGS)

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
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(PY) -m zhllama.heartbeat --label llama-cpp-python \
	  --log $(SAMPLE)/logs/setup-integration.log -- $(PY) -m pip install -v torch==2.13.0 -e '.[test,integration]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation torch==2.13.0 -e '.[deepspeed]'
	test -f $(LLAMA_SRC)/convert_hf_to_gguf.py || { \
	  $(PY) -m pip download -q --no-deps --no-binary :all: -d $(SAMPLE)/sdist llama-cpp-python==0.3.36 && \
	  $(PY) -c "import sys, tarfile, pathlib; t = tarfile.open(sys.argv[1]); d = pathlib.Path(sys.argv[2]); \
	    keep = ('convert_hf_to_gguf.py', 'conversion/', 'gguf-py/', 'LICENSE'); \
	    ms = [m for m in t.getmembers() if '/vendor/llama.cpp/' in m.name and m.name.split('/vendor/llama.cpp/', 1)[1].startswith(keep)]; \
	    [setattr(m, 'name', m.name.split('/vendor/llama.cpp/', 1)[1]) for m in ms]; t.extractall(d, members=ms, filter='data')" \
	    $(SAMPLE)/sdist/llama_cpp_python-0.3.36.tar.gz $(LLAMA_SRC); }
