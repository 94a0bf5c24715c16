# Newcomer commands (see README):  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dqp-installed

.PHONY: setup demo lint test test-all docs clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,solvers,docs,plots]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q --timeout=300

test-all: setup
	$(PY) -m pytest -q --timeout=1800 -m "slow or not slow"

docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
