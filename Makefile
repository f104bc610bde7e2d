# `make demo` and `make test` each set up .venv on first use (torch 2.13.0 CPU first, then the
# pinned lock, then this package), so a fresh machine needs nothing but python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saescope-installed
OUT ?= runs/demo

.PHONY: demo test bench setup clean

demo: $(STAMP)
	$(BIN)/saescope run --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/harvest.py --out runs/bench-harvest.json

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
