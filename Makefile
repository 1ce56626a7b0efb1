# The two commands of the README:
#   make bench   install (in .venv, created if missing) and run `fastdit bench` on this machine's device
#   make test    install (in .venv, created if missing) and run the whole test suite
# Both work on a fresh machine with no GPU. VENV=... and PYTHON=... override the defaults.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastdit-installed
PYTEST_ARGS ?= -n 2 --dist loadfile --timeout 1200

.PHONY: install test bench check compile-report clean

$(STAMP): setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/fastdit bench

check: $(STAMP)
	$(BIN)/fastdit check

compile-report: $(STAMP)
	$(BIN)/fastdit compile-report

clean:
	rm -rf build *.egg-info .pytest_cache
