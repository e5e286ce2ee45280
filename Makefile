# cd2p developer commands. `make test` is the project's test command (CI runs exactly it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cd2p-installed

.PHONY: install test lint format demo bench clean

# A virtual environment with cd2p (editable) and its dev tools; rebuilt when pyproject changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check cd2p tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix cd2p tests benchmarks

# pytest exit codes: 0 passed, 1 failures, 2-4 usage/internal errors, 5 no tests collected.
test: lint
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

demo: $(STAMP)
	$(BIN)/cd2p demo

bench: $(STAMP)
	$(BIN)/python benchmarks/ops.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
