# Two entry points for a fresh clone (see README):
#   make demo   - create .venv, install covshift pinned by constraints.txt, run the main job
#   make test   - the same setup if needed, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.covshift-installed

.PHONY: setup demo test bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/covshift run fig1

test: setup
	$(PY) -m pytest -n 2 -q

bench: setup
	$(PY) benchmarks/bn_speed.py
