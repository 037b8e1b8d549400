# Both targets set up everything they need on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint wheel-check docs bench clean

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

## The suite without the slow subprocess tests (training runs, multi-device checks).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## Build the wheel, install it into a clean venv and import it there: packaging mistakes fail here.
wheel-check: $(STAMP)
	rm -rf build/wheel build/wheel-venv
	$(PY) -m pip wheel -q --no-deps -w build/wheel .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install -q build/wheel/switchnorm-*.whl
	cd build && wheel-venv/bin/python -c "import switchnorm, importlib.resources as r; assert r.files('switchnorm').joinpath('py.typed').is_file(); print('wheel ok: switchnorm', switchnorm.__version__, switchnorm.__file__)"

## Lint gate: ruff's checks, its formatter and mypy (config in pyproject.toml) must all pass.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## HTML API reference from the docstrings: build/docs/index.html (installs pdoc, the `docs` extra).
docs: $(STAMP)
	$(PY) -c "import pdoc" 2>/dev/null || $(PY) -m pip install -q -e ".[docs]"
	rm -rf build/docs
	$(PY) -W "ignore:Error parsing type annotation" -m pdoc --docformat google --no-search \
		-o build/docs switchnorm switchnorm.train
	@echo "API reference: build/docs/index.html"

## Layer benchmark (see README, Performance).
bench: $(STAMP)
	$(PY) -m benchmarks.layer

clean:
	rm -rf $(VENV) runs .pytest_cache
