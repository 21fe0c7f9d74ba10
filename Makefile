# One command each: `make setup`, `make repro`, `make test` (see README.md).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: setup system-deps repro test test-fast lint ui bench

# Bytecode is compiled once here, for the dependencies and for our own (editable) package: where
# PYTHONDONTWRITEBYTECODE is set, as in many containers, every process would otherwise recompile the
# source of every module it imports.
setup:  ## create .venv from uv.lock (bootstraps uv with pip if missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet 'uv>=0.5'
	$(UV) sync --frozen --compile-bytecode
	.venv/bin/python -m compileall -q src
	.venv/bin/python -m vaeops.plots
	@echo "ready: source .venv/bin/activate (or prefix commands with 'uv run')"

system-deps:  ## Debian packages some tests use: Fashion-MNIST's system copy, Chromium for the UI test
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist chromium chromium-driver

repro:  ## the whole pipeline
	$(UV) run --frozen dvc repro

lint:
	$(UV) run --frozen ruff check src tests benchmarks
	$(UV) run --frozen ruff format --check src tests benchmarks

test: lint  ## every test, the slow end-to-end ones included
	$(UV) run --frozen pytest

test-fast:
	$(UV) run --frozen pytest -m "not slow"
