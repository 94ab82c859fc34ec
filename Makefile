# Two commands on a fresh machine: `make demo` and `make test-all` (what CI runs; `make test` is
# the fast tier, without the end-to-end runs marked slow).
# The CPU build of torch is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
PYTEST := $(BIN)/python -m pytest -q --timeout=900

.PHONY: install demo test test-all

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

demo: install
	$(BIN)/attune demo --out runs/demo

# pytest exits 5 when it collects no test; report that plainly instead of failing CI.
test: install
	@rc=0; $(PYTEST) -m "not slow" || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-all: install
	@rc=0; $(PYTEST) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
