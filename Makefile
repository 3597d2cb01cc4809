# Two commands on a fresh machine:  `make run` (set up + train + evaluate)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(or $(COVID_XRAY_DATA),data/Covid19-dataset)
RUN ?= runs/latest

.PHONY: run test setup browser clean

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

# Browser tests drive Debian's Chromium (Playwright cannot download browsers offline); installed
# here when we can (root with apt-get), otherwise those tests skip and say what to install.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium not installed; browser tests will be skipped"

test: setup browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
