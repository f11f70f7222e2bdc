# The two front-door commands: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# checkov pins its own dependency versions: it gets a virtualenv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30

.PHONY: setup demo local test lint lint-deploy

$(VENV)/.installed: requirements.txt requirements-tensorflow.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --editable .
	touch $@

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

setup: $(VENV)/.installed

demo: setup
	PYTHONPATH=. $(PY) -m localdev.demo

# The emulators and a served worker, kept running until Ctrl-C; `source .local-cloud.env` elsewhere.
local: setup
	PYTHONPATH=. $(PY) -m localdev.local

# Three processes (pytest-xdist), each with its own emulators (most tests wait on them, not on the
# CPU); a file's tests stay in one process, in order.
test: setup lint lint-deploy
	PYTHONPATH=. $(PY) -m pytest -n 3 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check worker localdev tests benchmarks
	$(VENV)/bin/ruff format --check worker localdev tests benchmarks
	$(VENV)/bin/mypy

# The Dockerfile and infra/ cannot be built or applied here: lint them instead.
lint-deploy: setup $(CHECKOV_VENV)/.installed
	$(VENV)/bin/hadolint Dockerfile
	@if command -v terraform >/dev/null; then terraform fmt -check -recursive -diff infra; \
	else echo "terraform not found: skipping terraform fmt -check (CI requires it)"; fi
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download -d infra --framework terraform
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download -f Dockerfile --framework dockerfile
