# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The CPU machines here cap torch at the releases on their disk; torchvision must match torch.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu install clean help

help:
	@echo "make demo   - every subsystem at a small size on this machine's device; table + results/*.yaml"
	@echo "make test   - the CPU test suite (GPU tests skip without CUDA)"

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

clean:
	rm -rf $(VENV) results .pytest_cache
