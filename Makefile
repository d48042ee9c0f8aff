# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The CPU machines here cap torch at the releases on their disk; torchvision must match torch.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu test-stack install clean help

help:
	@echo "make demo   - every subsystem at a small size on this machine's device; table + results/*.yaml"
	@echo "make test   - the CPU test suite (GPU tests skip without CUDA)"
	@echo "make test-stack STACK=device|oldest PYTHON=python3.12|python3.10 - the suite on other package versions"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@if ! $(BIN)/python -c "import torch, torchvision" 2>/dev/null; then \
	  echo "installing $(TORCH_PIN) (first time only)"; \
	  $(BIN)/pip install -q $(TORCH_PIN) || $(BIN)/pip install -q torch torchvision; fi
	$(BIN)/pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gpulab run experiments/smoke.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

# The CPU suite on another set of releases, in a venv of its own (downloads a few GB from PyPI the first time):
# STACK=device (scripts/stacks/device.txt: the GPU machine's, PYTHON=python3.12) or STACK=oldest (the
# declared lower bounds, PYTHON=python3.10).
STACK ?= device
PYTHON ?= python3.12
STACK_VENV := .venv-stack-$(STACK)
test-stack:
	@test -f scripts/stacks/$(STACK).txt || { echo "no scripts/stacks/$(STACK).txt"; exit 2; }
	@test -f $(STACK_VENV)/.installed || { rm -rf $(STACK_VENV) && $(PYTHON) -m venv $(STACK_VENV) && \
	  $(STACK_VENV)/bin/pip install -q -r scripts/stacks/$(STACK).txt && \
	  $(STACK_VENV)/bin/pip install -q --no-deps -e . && touch $(STACK_VENV)/.installed; }
	$(STACK_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .venv-stack-* results .pytest_cache
