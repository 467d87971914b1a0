# dynvm: `make lab` to try it against a simulated Xen lab, `make test` to run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    := $(VENV)/.installed-run
DEV    := $(VENV)/.installed-dev
LAB    ?= .lab
PORT   ?= 5000
HOSTS  ?= 4
VENDOR := src/dynvm/dashboard/static/vendor
APT    := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

.PHONY: install install-dev browser lab test lint format bench soak screenshots clean

# The libvirt binding builds against Debian's libvirt-dev: taken where it is installed
LIBVIRT_EXTRA := $(shell pkg-config --exists libvirt 2>/dev/null && echo ,libvirt)

# What running dynvm needs, and no more (make lab): the test tooling is install-dev's.
$(RUN): pyproject.toml setup.py
	@echo "make: [1/3] a virtual environment in $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "make: [2/3] dynvm and what it runs on, from PyPI (pip, about 20 s)"
	@$(BIN)/python -m pip install --quiet -e '.[postgres$(LIBVIRT_EXTRA)]'
	@touch $@

# The dashboard's front-end packages, from the npm registry as web/package-lock.json pins
# them, built files copied into the Python package: npm at install time only, never at run time.
$(VENDOR)/.installed: web/package.json web/package-lock.json web/vendor.py
	@echo "make: [3/3] the dashboard's front-end files, from the npm registry (npm ci)"
	@$(PYTHON) web/vendor.py --fresh $(VENDOR)
	@touch $@

# The tests', lint's and benches' tools (pytest, ruff, mypy, Playwright, Ansible, ...)
$(DEV): $(RUN)
	@echo "make: the test tooling (pytest, ruff, mypy, Playwright, Ansible, schemathesis, matplotlib)"
	@$(BIN)/python -m pip install --quiet -e '.[dev,postgres$(LIBVIRT_EXTRA)]'
	@touch $@

## install: dynvm into .venv, with what running it needs (then: .venv/bin/dynvm --help)
install: $(RUN) $(VENDOR)/.installed

## install-dev: install, and the test tooling
install-dev: install $(DEV)

## browser: Debian's Chromium, which the dashboard's tests drive through Playwright
browser:
	@command -v chromium >/dev/null || $(APT) || { apt-get update -qq && $(APT); }

## lab: dynvm on 127.0.0.1:$(PORT) (5000) serving a simulated Xen lab of $(HOSTS) (4) hosts; Ctrl-C stops both
lab: install
	$(BIN)/dynvm lab --hosts $(HOSTS) --port $(PORT) --directory $(LAB)

# Twice as many test workers as cores: most tests wait on sockets and timers, not the CPU
WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))

## test: the whole suite, in parallel (two workers a core); beside it, the real guests under
## libvirt (tests/libvirt), in a network namespace of their own (tests/libvirt/in-netns)
test: install-dev browser
	@rm -f .libvirt-tests.log; \
	tests/libvirt/in-netns $(BIN)/python -m pytest -q tests/libvirt > .libvirt-tests.log 2>&1 & guests=$$!; \
	$(BIN)/python -m pytest -n $(WORKERS) -q; suite=$$?; \
	wait $$guests; real=$$?; \
	echo "--- tests/libvirt (real guests, in their own network namespace) ---"; cat .libvirt-tests.log; \
	exit $$(( suite || real ))

lint: $(DEV)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/dynvm

format: $(DEV)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

## bench: speed and memory figures, printed as tables (never part of `make test`)
bench: $(DEV)
	$(BIN)/python -m bench

## soak: a bounded fault soak on SQLite and two PostgreSQL replicas (SOAK_MINUTES each, 10 by default)
soak: $(DEV)
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-10}

## screenshots: the dashboard's pictures in docs/ (a simulated lab, Debian's Chromium)
screenshots: install-dev browser
	$(BIN)/python -m bench.screenshots

clean:
	rm -rf $(VENV) $(LAB) .pytest_cache .ruff_cache build dist src/*.egg-info web/node_modules $(VENDOR)
