# `make demo` and `make test` each set up .venv on first use (torch 2.13.0 CPU first, then the
# pinned lock, then this package), so a fresh machine needs nothing but python3 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saescope-installed
OUT ?= runs/demo

PEERS ?= .venv-peers

.PHONY: demo test test-quick tutorials browser bench bench-suite bench-interop bench-gpu bench-quality bench-multilayer bench-circuit setup clean

demo: $(STAMP)
	$(BIN)/saescope run --out $(OUT)

# The whole suite, every test (CI runs this); tests/need-browser installs Chromium for the browser test.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

# For iterating: the suite less the tests marked slow (`make test` still runs them).
test-quick: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

# JupyterLab on the tutorial notebooks (`make test` executes them; commit them without outputs).
tutorials: $(STAMP)
	$(BIN)/jupyter lab tutorials

browser:
	@tests/need-browser

bench: $(STAMP)
	$(BIN)/python bench/harvest.py --out runs/bench-harvest.json

# The speed table (bench/suite.py), with the peers timed beside ours from a second venv that
# holds the same pins plus eai-sparsify and sae-lens (kept apart so they never move our pins).
bench-suite: $(STAMP) $(PEERS)/.installed
	$(BIN)/python bench/suite.py --peers $(PEERS)/bin/python --out runs/bench-suite.json

# The CUDA check (bench/gpu.py): the fast-path tests, step and matmul rates, the pipeline and torchrun
# on the GPU, in under 8 minutes; without CUDA, every part on the CPU at tiny shapes.
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py --out runs/gpu.json

# SAELens reads the SAELens and Gemma Scope 2 folders we write (every objective option, BatchTopK
# before and after conversion, transcoders with and without a skip); circuit-tracer's loaders read
# our transcoders' and a CLT's Gemma Scope 2 files.
bench-interop: $(STAMP) $(PEERS)/.installed
	$(PEERS)/bin/python bench/interop.py

# Dictionary quality per token (bench/quality.py): our variants, sparsify's TopK and SAELens's
# JumpReLU on one store, evaluated on held-out docstrings and out-of-distribution prose (Debian's
# fortunes). Hours at both widths and all budgets on a 2-core CPU; QUALITY_ARGS narrows it.
QUALITY_ARGS ?= --widths 4096,16384 --budgets 0.25M,1M,4M
bench-quality: $(STAMP) $(PEERS)/.installed
	@test -d /usr/share/games/fortunes || apt-get install -y -q fortunes >/dev/null
	$(BIN)/python bench/quality.py --peers $(PEERS)/bin/python $(QUALITY_ARGS)

# Transcoders at equal L0 and budget on Gemma 3 270M (bench/multilayer.py): plain against skip at
# one layer, then a cross-layer transcoder against plain and skip transcoder sets over all 18 layers.
bench-multilayer: $(STAMP)
	$(BIN)/python bench/multilayer.py
	$(BIN)/python bench/multilayer.py --all-layers --width 2048 --tokens 400K

# our attribution graphs against circuit-tracer's on the same transcoders and prompts (its own venv: it pins transformers ≤ 4.57)
CIRCUIT ?= .venv-circuit
bench-circuit: $(STAMP) $(CIRCUIT)/.installed
	$(BIN)/python bench/circuit.py --peer-python $(CIRCUIT)/bin/python

$(CIRCUIT)/.installed:
	$(PYTHON) -m venv $(CIRCUIT)
	$(CIRCUIT)/bin/pip install --quiet torch==2.13.0
	$(CIRCUIT)/bin/pip install --quiet circuit-tracer==0.5.0
	touch $@

$(PEERS)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet torch==2.13.0
	$(PEERS)/bin/pip install --quiet -r requirements.lock
	$(PEERS)/bin/pip install --quiet --no-deps -e .
	$(PEERS)/bin/pip install --quiet eai-sparsify==1.3.3 sae-lens==6.54.12
	$(PEERS)/bin/pip install --quiet --no-deps circuit-tracer==0.5.0  # its file loaders only (it pins transformers ≤ 4.57)
	touch $@

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(PEERS) $(CIRCUIT) runs build src/*.egg-info
