# Arus: `make demo` runs the whole platform with simulated Jember sensors; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Reinstall only when the project's dependencies change.
STAMP  := $(VENV)/.arus-installed

.PHONY: help venv install demo up test test-unit test-integration tools lint clean

help:
	@echo "make demo   - install, then run the whole stack with the simulator (arus up --simulate)"
	@echo "make test   - install, then run every test (unit, integration, chaos)"
	@echo "make lint   - ruff and mypy"
	@echo "make venv | install | up | test-unit | test-integration | tools | clean"

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: install
	$(BIN)/arus up --simulate

up: install
	$(BIN)/arus up

# What the tests use from the system, and what happens without it.
tools:
	@missing=0; \
	if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then \
	  echo "note: mosquitto not found: the MQTT tests use amqtt instead, and the broker-restart test is skipped (apt-get install mosquitto)"; missing=1; fi; \
	if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  echo "note: chromium not found: the browser (console) tests are skipped (apt-get install chromium)"; missing=1; fi; \
	if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  echo "note: PostgreSQL server binaries not found: the integration tests need them (apt-get install postgresql)"; missing=1; fi; \
	if [ $$missing = 0 ]; then echo "system tools: mosquitto, chromium, postgresql all present"; fi

test: install tools
	$(BIN)/pytest -ra tests

test-unit: install
	$(BIN)/pytest -ra tests/unit

test-integration: install tools
	$(BIN)/pytest -ra tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache build *.egg-info
