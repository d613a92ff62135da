# The two commands of the README: `make run` and `make test`. Everything else is a step of theirs.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/switch.toml

.PHONY: setup run dev-setup test lint typecheck unit bench soak clean

setup:
	@bash scripts/bootstrap.sh

# Dev PKI, dev token with the demo keys and demo cards on first run; then the switch in the foreground.
dev-setup: setup
	$(BIN)/cardswitch dev-setup --config $(CONFIG)

run: dev-setup
	exec $(BIN)/cardswitch serve --config $(CONFIG)

lint: setup
	$(BIN)/ruff check switch hsm tests benchmarks
	$(BIN)/ruff format --check switch hsm tests benchmarks

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# The switch against its baselines in one run (a few minutes): benchmarks/RESULTS.md, plots and
# JSON under benchmarks/reports/. The other benchmarks (hsm_bench, store_reads, load) run alone.
bench: setup
	$(BIN)/python -c "import hdrh, matplotlib" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m benchmarks.results

# The long adversarial runs, never part of `make test`: the stateful model with many examples
# (both stores), each fuzz target under atheris for FUZZ_RUNS inputs (or FUZZ_SECONDS each),
# the hypothesis fuzz targets long, the live-socket fuzz with many frames, and the tests
# marked slow (excluded from `make test` by pyproject's addopts), and the crash tests long:
# CRASH_ROUNDS kill -9 rounds of the single SQLite process and CRASH_ROUNDS kills among three
# instances on PostgreSQL (CARDSWITCH_CRASH_ROUNDS), and WORKER_CRASH_ROUNDS rounds of a
# worker and then the whole group killed, on each backend, and SOAK_SECONDS of mixed load on
# the real process with its fds and RSS sampled (CARDSWITCH_SOAK_SECONDS). Crashers land in
# tests/fuzz/crashers/<target>/: keep them, tests/test_fuzz_regressions.py replays them.
MODEL_EXAMPLES ?= 5000
FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 1800
FUZZ_TARGETS := framing codec messages session
CRASH_ROUNDS ?= 100
CRASH_SEED ?= 1
WORKER_CRASH_ROUNDS ?= 10
SOAK_SECONDS ?= 300
soak: setup
	$(BIN)/python -m pip install -q -e '.[test,fuzz]'
	CARDSWITCH_MODEL_EXAMPLES=$(MODEL_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider tests/test_model_stateful.py
	CARDSWITCH_FUZZ_EXAMPLES=20000 $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz_targets.py
	CARDSWITCH_LIVE_FUZZ_FRAMES=20000 $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz_live.py
	for t in $(FUZZ_TARGETS); do \
		PYTHONPATH=$(CURDIR):$(CURDIR)/tests $(BIN)/python -m fuzz.run $$t \
			-runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
	CARDSWITCH_CRASH_ROUNDS=$(CRASH_ROUNDS) CARDSWITCH_CRASH_SEED=$(CRASH_SEED) \
		$(BIN)/pytest -q -s -p no:cacheprovider tests/test_crash_safety.py
	CARDSWITCH_CRASH_ROUNDS=$(CRASH_ROUNDS) CARDSWITCH_CRASH_SEED=$(CRASH_SEED) \
		$(BIN)/pytest -q -s -p no:cacheprovider tests/test_instances_crash.py
	CARDSWITCH_CRASH_ROUNDS=$(WORKER_CRASH_ROUNDS) $(BIN)/pytest -q -s -p no:cacheprovider \
		tests/test_workers_crash.py
	CARDSWITCH_SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -q -s -p no:cacheprovider \
		tests/test_soak_process.py
	$(BIN)/pytest -q -p no:cacheprovider -m slow || [ $$? -eq 5 ]  # 5: none marked slow

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
