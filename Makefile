# qnwb developer commands. Every target sets up the local virtual environment (.venv) when it
# is missing or when settings.ini / setup.py changed since it was made, and reuses it otherwise.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qnwb-installed
# The CPU build on this machine; install it before anything that depends on torch, or pip
# pulls the multi-GB CUDA build.
TORCH := torch==2.13.0
# Extra arguments for `make lab`, e.g. LAB_ARGS="--no-browser --port 8890".
LAB_ARGS ?=
# `make report` renders this report (a template of nbs/reports) with these extra arguments.
REPORT ?= tour
REPORT_ARGS ?=
# Jupyter refuses to start as root (as on containers and CI machines) without this flag.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
# nbdev_test runs `#| cuda` cells when the kernel sees a GPU; `#| slow` cells only in test-slow.
CUDA_FLAG = $$($(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else '')")

.PHONY: help setup test test-generic test-slow report lab sync format readme clean-venv dist docs

help:
	@echo "make report     set up .venv if needed and render the tour report to data/reports/tour-*.html (REPORT=name, REPORT_ARGS=\"-p key value\")"
	@echo "make test       set up .venv if needed, check notebooks/library/README are in sync, run nbdev_test and pytest"
	@echo "make test-generic  the same with ATEN_CPU_CAPABILITY=default (torch's generic CPU kernels, as on a CPU without AVX2)"
	@echo "make lab        set up .venv if needed and start JupyterLab with the 'Python (qnwb)' kernel"
	@echo "make test-slow  also run the cells and tests marked slow"
	@echo "make sync       nbdev_export + nbdev_clean + make readme, in place"
	@echo "make format     ruff's fixes and formatting on the notebooks, tests and tools, then make sync"
	@echo "make readme     regenerate README.md from nbs/index.ipynb"
	@echo "make dist       build the sdist and the wheel into dist/ (report templates inside) and check them with twine"
	@echo "make docs       build the documentation site into docs/_build/html from the notebooks (run and cached as they build)"
	@echo "make clean-venv remove .venv"

setup: $(STAMP)

$(STAMP): settings.ini setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qnwb needs Python >= 3.11: run make with PYTHON=python3.11")'
	@echo "Setting up $(VENV) (torch first, then qnwb in editable mode with its dev extras)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name qnwb --display-name "Python (qnwb)" >/dev/null
	touch $@

# Tests write their runs to a throw-away store, never to the developer's data/qnwb.sqlite.
TEST_STORE = QNWB_STORE=$$(mktemp -d)/test.sqlite

report: $(STAMP)
	$(BIN)/qnwb report $(REPORT) $(REPORT_ARGS)

# ruff lints and format-checks the sources: the notebooks (qnwb/ is exported from them), the tests, the tools and the
# documentation's configuration.
LINTED = nbs/[0-9]*.ipynb tests tools docs/*.py

define RUN_TESTS
	$(BIN)/python tools/nbsync.py check
	$(BIN)/ruff format --check --quiet $(LINTED)
	$(BIN)/ruff check --quiet $(LINTED) qnwb
	$(TEST_STORE) $(BIN)/nbdev_test --timing --flags "$(CUDA_FLAG)"
	$(TEST_STORE) $(BIN)/python -m pytest tests
endef

test: $(STAMP)
	$(RUN_TESTS)

# The numeric bounds must hold whichever kernels a CPU gets: torch picks AVX-512, AVX2 or generic code at start-up, and
# each sums in its own order. This runs the whole suite on the generic kernels.
test-generic: export ATEN_CPU_CAPABILITY = default
test-generic: $(STAMP)
	@$(BIN)/python -c "import torch; print('torch CPU capability:', torch.backends.cpu.get_cpu_capability())"
	$(RUN_TESTS)

test-slow: $(STAMP)
	$(BIN)/python tools/nbsync.py check
	$(TEST_STORE) $(BIN)/nbdev_test --timing --flags "slow $(CUDA_FLAG)"
	$(TEST_STORE) $(BIN)/python -m pytest tests --runslow

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG) $(LAB_ARGS)

sync: $(STAMP)
	$(BIN)/python tools/nbsync.py fix

format: $(STAMP)
	$(BIN)/ruff check --fix --quiet $(LINTED)
	$(BIN)/ruff format --quiet $(LINTED)
	$(BIN)/python tools/nbsync.py fix

readme: $(STAMP)
	$(BIN)/python tools/nbsync.py readme

clean-venv:
	rm -rf $(VENV)

# The documentation site: docs/pages.py makes its pages from the notebooks into $(DOCS)/source, myst-nb runs them
# (jupyter-cache in $(DOCS)/.jupyter_cache re-runs a notebook when its code or the library changed) and the build
# stops at a cell that raises. Open $(DOCS)/html/index.html, or serve it: python -m http.server -d $(DOCS)/html
DOCS ?= docs/_build
docs: $(STAMP)
	mkdir -p $(DOCS)/source
	$(BIN)/python -m sphinx -b html -j 2 -q -d $(DOCS)/doctrees -c docs $(DOCS)/source $(DOCS)/html
	@echo "The site is in $(DOCS)/html: open $(DOCS)/html/index.html"

# The sdist and the wheel, from settings.ini; the wheel carries the report templates (setup.py copies nbs/reports).
dist: $(STAMP)
	rm -rf dist build
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
