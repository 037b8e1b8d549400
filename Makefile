# Both targets set up everything they need on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint wheel-check docs bench results mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

## Train a small SwitchNorm CNN on scikit-learn's digits, print accuracy and learned weights.
demo: $(STAMP)
	$(VENV)/bin/switchnorm train --dataset digits --norm sn --epochs 30 --eval-every 10 --out runs/demo --overwrite

## Test workers: one per CPU (pytest-xdist); each test file runs whole on one worker, so a
## module's shared fixtures (a trained run, the multi-device scenarios) are built once.
## `make test PARALLEL=` runs in one process.
PARALLEL ?= -n auto --dist loadfile

## Run the test suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL)

## The suite without the slow subprocess tests (training runs, multi-device checks).
test-quick: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL) -m "not slow"

## Build the wheel, install it into a clean venv and import it there: packaging mistakes fail here.
wheel-check: $(STAMP)
	rm -rf build/wheel build/wheel-venv
	$(PY) -m pip wheel -q --no-deps -w build/wheel .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install -q build/wheel/switchnorm-*.whl
	cd build && wheel-venv/bin/python -c "import switchnorm, switchnorm_command, importlib.resources as r; assert r.files('switchnorm').joinpath('py.typed').is_file(); print('wheel ok: switchnorm', switchnorm.__version__, switchnorm.__file__)"

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
		-o build/docs switchnorm switchnorm.linen switchnorm.train
	@echo "API reference: build/docs/index.html"

## Layer benchmark (see README, Performance).
bench: $(STAMP)
	$(PY) -m benchmarks.layer

## Rerun every number of README's results table and docs/results.md (about an hour, not in CI):
## accuracy over seeds 0-2, speed and compile ratios, figures. Rewrites docs/results.md, docs/results.json,
## docs/figures and README's table. `make results ARGS=--quick`: a minutes-long subset, into build/results-quick.
ARGS ?=
results: $(STAMP)
	$(PY) -m benchmarks.results $(ARGS)

## Mutation testing of the core math with mutmut (slow, not in CI): plants small changes in
## MUTATE_FILES and counts those the core's reference tests (see [tool.mutmut] in
## pyproject.toml) catch. Runs every MUTATE_STRIDE-th mutant of each function, at nice 19.
## Results: `$(VENV)/bin/mutmut results`, one mutant's diff: `$(VENV)/bin/mutmut show NAME`.
MUTATE_FILES := switchnorm/_core.py switchnorm/_stats.py switchnorm/_passes.py switchnorm/_xla_cpu.py switchnorm/_mixing.py
MUTATE_STRIDE ?= 12
MUTMUT := mutmut==3.8.1
mutate: $(STAMP)
	$(PY) -m pip install -q "$(MUTMUT)"
	rm -rf mutants
	mkdir -p build
	nice -n 19 $(PY) tests/mutation_sample.py $(MUTATE_STRIDE) $(MUTATE_FILES) > build/mutants.txt
	nice -n 19 $(VENV)/bin/mutmut run --max-children 2 $$(cat build/mutants.txt)

clean:
	rm -rf $(VENV) runs .pytest_cache
