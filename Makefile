# Two commands on a fresh machine:  `make run` (set up + train + evaluate)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(or $(COVID_XRAY_DATA),data/Covid19-dataset)
RUN ?= runs/latest

V2 := .venv-v2

.PHONY: run test test-sdk-v2 sagemaker-image setup browser clean

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

# SDK v2 beside v3: one line per environment, so v2 gets a second small one (the SDK, pytest, pillow) that
# runs only the launcher's SDK-object tests; the main run compares both lines' objects through it.
$(V2)/.installed: pyproject.toml
	$(PYTHON) -m venv $(V2)
	$(V2)/bin/python -m pip install --quiet "$$($(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["sagemaker-v2"])')" "pytest>=8" "pillow>=10.0"
	touch $@

test-sdk-v2: $(V2)/.installed
	PYTHONPATH=src $(V2)/bin/python -m pytest -p no:cacheprovider tests/test_sagemaker_sdk.py

# SageMaker local mode in Docker: a stand-in for AWS's PyTorch images, built without a registry (docker/README.md);
# reused while docker/ is unchanged. Status 3 means Docker cannot run on this machine (not root, no apt, no
# daemon): the local-mode tests then skip and say why. Any other failure fails the build.
sagemaker-image:
	@bash docker/build-image.sh; status=$$?; \
	  if [ $$status = 3 ]; then echo "note: Docker cannot run here; the SageMaker local-mode tests will be skipped"; \
	  elif [ $$status != 0 ]; then exit $$status; fi

test: setup browser $(V2)/.installed sagemaker-image
	COVID_XRAY_OTHER_SDK_PYTHON=$(CURDIR)/$(V2)/bin/python $(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-sdk-v2

clean:
	rm -rf $(VENV) $(V2) runs .pytest_cache
