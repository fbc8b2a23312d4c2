# Two entry points for a fresh clone: `make demo` and `make test` (`make test-fast`: the edit loop's
# tier, every test but the end-to-end ones marked `slow`).
# Both bootstrap .venv on first use (torch first, so the CPU build on this
# machine satisfies the range and no CUDA wheels are pulled) and reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gfattn-installed
TORCH  ?= torch==2.13.0
# test workers: one more than the cores, since many tests spend part of their time waiting (the TUI's event
# loop, subprocesses and torchrun launches being polled) and one more worker fills that time
WORKERS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')

.PHONY: demo test test-fast lint venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gfattn pipeline

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist worksteal tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist worksteal -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .gfattn-cache gfattn.db gfattn.db-wal gfattn.db-shm
