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

# HSM command latency, then the full authorization path against the echo-only baseline.
bench: setup
	$(BIN)/python -m benchmarks.hsm_bench
	$(BIN)/python -m benchmarks.load

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
