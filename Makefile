# One venv at the repo root holds everything; every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) output modules
