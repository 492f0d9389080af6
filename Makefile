# bamray: two commands on a fresh machine.
#   make run    set up (.venv, Fashion-MNIST) and train BAM on Fashion-MNIST with 2 local Ray workers
#   make test   set up and run the test suite (what .ci/run runs)
#   make test-fast  the fast unit tests alone (no Ray, no subprocess-heavy tests): under a minute
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bamray-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data run test test-fast lint bench ui clean

setup: $(STAMP) $(FMNIST)

# Reinstall only when pyproject.toml changed; the venv is reused when present.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,sweep,export]'
	@touch $(STAMP)

# Fashion-MNIST ships as a Debian package (original IDX files, MIT licence).
$(FMNIST):
	@if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST: no apt-get here. Put the 4 IDX .gz files in a folder and run:"; \
	  echo "  $(BIN)/bamray data prepare fashion-mnist --src <folder>"; exit 1; \
	fi

# The MLflow UI test opens it in a real headless browser: Debian's chromium, installed like the data set.
$(CHROMIUM):
	@if command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	else \
	  echo "chromium: no apt-get here; install a Chromium as $(CHROMIUM) (or on PATH) for the UI test"; \
	fi

data: setup
	$(BIN)/bamray data prepare fashion-mnist

run: setup
	$(BIN)/bamray train --config bam_fmnist

test: setup $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# Markers `ray` / `slow` are set by tests/conftest.py (Ray files and fixtures, CLI subprocess tests).
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not ray and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench

ui: setup
	$(BIN)/bamray ui

clean:
	rm -rf .bamray
