# Quick start: `make demo` (runs denuc predict on the bundled sample) and `make test`.
# Both create or refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test env bench

$(BIN)/.denuc-env: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

env: $(BIN)/.denuc-env

demo: env
	$(BIN)/denuc predict src/denuc/assets/sample --mpp 0.5 --out outputs/demo
	@echo "wrote outputs/demo/ (CSV, summary JSON and overlay PNG per image); try: $(BIN)/denuc --help"

test: env
	$(BIN)/python -m pytest -q -n 2
