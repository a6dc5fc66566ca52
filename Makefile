# deephash: two commands for a new user. `make demo` runs the main job end to end; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN ?= runs/demo-48

.PHONY: venv test demo demo-2d bench data system-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages: Chromium and its driver (browser tests) and Fashion-MNIST, installed with
# apt-get when missing; without a usable apt-get one line says what to install. `make test` goes on
# (the tests that need them then fail, never skip); `make demo` stops.
data:
	@bash scripts/ensure-system-packages.sh demo

system-test:
	@bash scripts/ensure-system-packages.sh test || true

test: venv system-test
	OMP_NUM_THREADS=2 $(PY) -m pytest -x -q --timeout=600

demo: venv data
	OMP_NUM_THREADS=2 bash scripts/demo.sh $(RUN)

demo-2d: venv data
	OMP_NUM_THREADS=2 DEMO_2D=1 bash scripts/demo.sh $(RUN)

bench: venv data
	OMP_NUM_THREADS=2 $(PY) bench/mining.py
	OMP_NUM_THREADS=2 $(PY) bench/search.py
	OMP_NUM_THREADS=2 $(PY) bench/layout.py

clean:
	rm -rf $(VENV) runs .pytest_cache
