# Both targets set up everything they need on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

## Train a small SwitchNorm CNN on scikit-learn's digits, print accuracy and learned weights.
demo: $(STAMP)
	$(VENV)/bin/switchnorm train --dataset digits --norm sn --epochs 30 --eval-every 10 --out runs/demo --overwrite

## Run the test suite.
test: $(STAMP)
	$(PY) -m pytest -q

## Layer benchmark (see README, Performance).
bench: $(STAMP)
	$(PY) -m benchmarks.layer

clean:
	rm -rf $(VENV) runs .pytest_cache
