# The two commands of the README: `make run` and `make test`. Everything else is a step of theirs.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/switch.toml

.PHONY: setup run dev-setup test lint typecheck unit bench clean

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

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
