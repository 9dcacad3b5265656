# Every target sets itself up from a fresh clone: it creates .venv, installs torch (the CPU
# build by default, or whatever TORCH names; an importable torch in PYTHON is reused), then
# the project with its test extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.traindeck-installed
DEMO_ARGS ?=

.PHONY: help setup test lint demo bench clean

help:
	@echo "make demo    train the demo recipe and serve its dashboard"
	@echo "make test    lint and run the whole test suite"
	@echo "make bench   run every benchmark in bench/"
	@echo "variables:   TORCH='torch==X' to choose the torch to install; PYTHON=python3.11"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "setup: reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "setup: installing $(TORCH)"; \
	  $(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m server.cli serve demo --run-dir runs/demo --resume $(DEMO_ARGS)

bench: $(STAMP)
	@for b in $(filter-out bench/paired.py,$(wildcard bench/*.py)); do echo "=== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
