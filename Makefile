# Two commands on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo test

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
	@rc=0; $(BIN)/python -m pytest -q --timeout=900 || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
