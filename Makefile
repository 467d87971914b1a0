# dynvm: `make lab` to try it against a simulated Xen lab, `make test` to run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LAB    ?= .lab

.PHONY: install lab test lint format bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

## lab: dynvm on 127.0.0.1:5000 serving a simulated Xen lab of 4 hosts (Ctrl-C stops both)
lab: $(STAMP)
	$(BIN)/dynvm lab --hosts 4 --port 5000 --directory $(LAB)

## test: the whole suite, in parallel on every core
test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

## bench: speed and memory figures, printed as tables (never part of `make test`)
bench: $(STAMP)
	$(BIN)/python -m bench

## soak: a bounded fault soak on SQLite and two PostgreSQL replicas (SOAK_MINUTES each, 10 by default)
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-10}

clean:
	rm -rf $(VENV) $(LAB) .pytest_cache .ruff_cache build dist src/*.egg-info
