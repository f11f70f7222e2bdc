# The two front-door commands: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	PYTHONPATH=. $(PY) -m localdev.demo

test: setup lint
	PYTHONPATH=. $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check worker localdev tests
	$(VENV)/bin/ruff format --check worker localdev tests
	$(VENV)/bin/mypy
