# Two commands on a fresh machine:  `make run` (set up + train + evaluate)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(or $(COVID_XRAY_DATA),data/Covid19-dataset)
RUN ?= runs/latest

.PHONY: run test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/covid-xray train --data "$(DATA)" --out "$(RUN)"

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
