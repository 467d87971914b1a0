# dynvm: `make lab` to try it against a simulated Xen lab, `make test` to run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LAB    ?= .lab
VENDOR := src/dynvm/dashboard/static/vendor
APT    := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

.PHONY: install browser lab test lint format bench soak screenshots clean

# The libvirt binding builds against Debian's libvirt-dev: taken where it is installed
LIBVIRT_EXTRA := $(shell pkg-config --exists libvirt 2>/dev/null && echo ,libvirt)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres$(LIBVIRT_EXTRA)]'
	touch $(STAMP)

# The dashboard's front-end packages, from the npm registry as web/package-lock.json pins
# them, built files copied into the Python package: npm at install time only, never at run time.
$(VENDOR)/.installed: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "make: npm is needed to install the dashboard's front-end packages (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp web/node_modules/uplot/dist/uPlot.iife.min.js web/node_modules/uplot/dist/uPlot.min.css $(VENDOR)/
	cp web/node_modules/uplot/LICENSE $(VENDOR)/uPlot.LICENSE
	touch $@

install: $(STAMP) $(VENDOR)/.installed

## browser: Debian's Chromium, which the dashboard's tests drive through Playwright
browser:
	@command -v chromium >/dev/null || $(APT) || { apt-get update -qq && $(APT); }

## lab: dynvm on 127.0.0.1:5000 serving a simulated Xen lab of 4 hosts (Ctrl-C stops both)
lab: install
	$(BIN)/dynvm lab --hosts 4 --port 5000 --directory $(LAB)

# Twice as many test workers as cores: most tests wait on sockets and timers, not the CPU
WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))

## test: the whole suite, in parallel (two workers a core); beside it, the real guests under
## libvirt (tests/libvirt), in a network namespace of their own (tests/libvirt/in-netns)
test: install browser
	@rm -f .libvirt-tests.log; \
	tests/libvirt/in-netns $(BIN)/python -m pytest -q tests/libvirt > .libvirt-tests.log 2>&1 & guests=$$!; \
	$(BIN)/python -m pytest -n $(WORKERS) -q; suite=$$?; \
	wait $$guests; real=$$?; \
	echo "--- tests/libvirt (real guests, in their own network namespace) ---"; cat .libvirt-tests.log; \
	exit $$(( suite || real ))

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/dynvm

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

## bench: speed and memory figures, printed as tables (never part of `make test`)
bench: $(STAMP)
	$(BIN)/python -m bench

## soak: a bounded fault soak on SQLite and two PostgreSQL replicas (SOAK_MINUTES each, 10 by default)
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-10}

## screenshots: the dashboard's pictures in docs/ (a simulated lab, Debian's Chromium)
screenshots: install browser
	$(BIN)/python -m bench.screenshots

clean:
	rm -rf $(VENV) $(LAB) .pytest_cache .ruff_cache build dist src/*.egg-info web/node_modules $(VENDOR)
