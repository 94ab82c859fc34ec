# Two commands on a fresh machine: `make demo` and `make test-all` (what CI runs; `make test` is
# the fast tier, without the end-to-end runs marked slow).
# The CPU build of torch is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
PYTEST := $(BIN)/python -m pytest -q --timeout=900

.PHONY: install demo test test-all typecheck figures

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

# mypy sees the package as it is imported: attune/ with client/, server/, shared/, simulations/ in it.
typecheck: install
	@tmp=$$(mktemp -d) && mkdir $$tmp/attune && cp attune/__init__.py $$tmp/attune/ && \
	for d in client server shared simulations; do ln -s $(CURDIR)/$$d $$tmp/attune/$$d; done && \
	cd $$tmp && $(CURDIR)/$(BIN)/python -m mypy -p attune --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache; rc=$$?; rm -rf $$tmp; exit $$rc

test-all: install typecheck
	@rc=0; $(PYTEST) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Every figure the README prints, regenerated (hours on 2 cores; MovieLens-100K from ../shared).
# Rerun after any change that moves seeded numbers; each command's seed is the one the README names.
ML := ../shared/datasets/ml-100k
figures: install
	$(BIN)/attune demo --out runs/demo
	$(BIN)/python benchmarks/catalog_size.py
	$(BIN)/python benchmarks/round_cost.py
	$(BIN)/python benchmarks/device.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/local_population.py
	$(BIN)/python benchmarks/centralized_movielens.py
	$(BIN)/python benchmarks/diversity.py
	$(BIN)/attune audit --no-dp --seed 0 --out benchmarks/results/audit_no_dp.json
	$(BIN)/attune audit --noise-multiplier 1 --seed 0 --out benchmarks/results/audit_noise1.json
	$(BIN)/attune audit --noise-multiplier 3 --seed 0 --out benchmarks/results/audit_noise3.json
	$(BIN)/attune sweep --dataset movielens --data $(ML) --modes distributed,local \
		--algorithms partial-local,ditto,global --epsilons 1,2,4,8,none --seeds 0,1 --out runs/sweep_movielens
	cp runs/sweep_movielens/sweep.csv benchmarks/results/sweep_movielens.csv
	cp runs/sweep_movielens/sweep.json benchmarks/results/sweep_movielens.json
	cp runs/sweep_movielens/sweep.png docs/sweep_movielens.png
	$(BIN)/attune simulate --dataset movielens --data $(ML) --backend flower --rounds 30 --out runs/flower_ml_all
	cp runs/flower_ml_all/results.json benchmarks/results/flower_movielens_all_devices.json
	$(BIN)/attune simulate --dataset movielens --data $(ML) --rounds 30 --noise per-device --out runs/fast_ml_all
	cp runs/fast_ml_all/results.json benchmarks/results/fast_movielens_all_devices_per_device_noise.json
	$(BIN)/attune simulate --dataset movielens --data $(ML) --backend flower --devices-per-round 100 --rounds 30 \
		--out runs/flower_ml_100
	cp runs/flower_ml_100/results.json benchmarks/results/flower_movielens_100_per_round.json
