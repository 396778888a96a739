# Every target installs what is missing first, so `make train` and `make test` each work alone
# on a fresh clone. Override the interpreter with `make PYTHON=python3.12 ...`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install train test test-slow bench toy-bench grids vae-bench tensorboard clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m gantrain +experiment=wgan_gp $(ARGS)

# Two processes (pytest-xdist): most tests wait on a subprocess or one core, so 2 cores halve the suite.
# One process: .venv/bin/python -m pytest
test: $(STAMP)
	$(PY) -m pytest -n 2

# pytest exits 5 when no test carries the mark yet; that is not a failure.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) scripts/bench.py --write docs/benchmarks.md

toy-bench: $(STAMP)
	$(PY) scripts/toy_benchmark.py --jobs 2 --write docs/benchmarks.md

grids: $(STAMP)
	$(PY) scripts/recipe_grids.py --write docs/benchmarks.md

vae-bench: $(STAMP)
	$(PY) scripts/vae_benchmark.py --write docs/benchmarks.md $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf $(VENV) outputs .pytest_cache
