# Everything a fresh clone needs: `make run` serves conf/registry.yaml, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: install run test test-unit lint clean system-tools bench bench-tools bench-profile

install: $(STAMP)

# Re-install only when the package metadata changed; the venv itself is made once.
$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[demo,test,dev]'
	touch $(STAMP)

# Real MCP servers and clients from npm that the tests run (server-everything, the MCP Inspector CLI).
$(NODE_STAMP): tests/node/package.json $(wildcard tests/node/package-lock.json)
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	cd tests/node && npm install --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Tools the tests use: curl (README examples), unshare and ip (a network namespace
# for the seed registry test), nginx (in front of the gateway), node and npm (server-everything).
system-tools:
	@missing=""; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v unshare >/dev/null || missing="$$missing util-linux"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

# The benchmark's load generator (wrk) and the proxy it compares with (nginx).
bench-tools:
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

# Side-by-side benchmark (issue 6): the gateway under real gunicorn vs. the servers alone,
# nginx and peer gateways; writes .bench/results.json and .bench/table.md. BENCH_* settings:
# see tests/bench/__main__.py (e.g. BENCH_SECONDS=5, BENCH_ONLY=stdio,http).
bench: install $(NODE_STAMP) bench-tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tests.bench

# Where a gateway worker's time goes under that load (py-spy; report in .bench/profile.md).
bench-profile: install $(NODE_STAMP) bench-tools
	test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet 'py-spy>=0.4'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tests.bench.profile

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/gunicorn --config conf/gunicorn.conf.py wsgi:app

test: install $(NODE_STAMP) system-tools
	$(BIN)/python -m pytest

# The fast loop: tests that start no process (make test runs them all).
test-unit: install
	$(BIN)/python -m pytest -m "not integration" -q

# The rule set, declared here so every ruff version checks the same: pycodestyle errors, pyflakes,
# bugbear, pyupgrade, simplify, pylint errors and warnings, blind except, import order.
# PLW0603: a worker's few singletons (its fork server, its thread count) are module globals on purpose.
RUFF_RULES := E4,E7,E9,F,B,UP,SIM,PLE,PLW,BLE,I
lint: install
	$(BIN)/ruff check --select $(RUFF_RULES) --ignore PLW0603 gateway tests wsgi.py conf
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules .bench
