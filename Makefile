# fedline — two commands do all set-up on a fresh machine:
#   make demo   the whole story on one laptop (private Mosquitto, aggregator, four sites)
#   make demo-cmapss   the same on NASA C-MAPSS FD001 (RUL regression, four plants, splits by engine)
#   make test   the test suite (a representative set; `make test-slow` runs the soak tests)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# make test runs the suite on this many pytest-xdist workers (0: in this process, one test at a time). Three on
# the 2-core CI machine: with two, a third of the cores' time goes idle while tests wait (brokers, reconnect
# back-offs, the outages the fault tests stage, RabbitMQ booting), so a third worker runs while two wait. Measured 2026-12-02 on the 2-vCPU VM (load
# 1-4 from others, one run each, 1125 tests): 411 s wall with two workers, 386 s with three (the tree before the
# cluster and ordering changes: 456 s with two); three cost more CPU time (660 s against 539 s: contention).
# tests/conftest.py orders the longest tests first and keeps the RabbitMQ cluster's tests on one worker.
TEST_WORKERS ?= 3
XDIST := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,)

.PHONY: venv lock sysdeps check test test-slow test-all demo demo-cmapss bench fuzz clean

# Installs from the lock (requirements.lock, pip constraints) so a new release of a dependency cannot
# break main unannounced; `make lock` rewrites it from what is installed after a deliberate upgrade.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

lock: venv
	@{ echo "# fedline's lock: every package of a '.[dev]' install at the versions CI tested (pip constraints)."; \
	  echo "# Regenerate with 'make lock' after changing pyproject.toml's dependencies."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^fedline'; } > requirements.lock

venv: $(STAMP)

# Mosquitto (the real broker the integration tests and the demo use), RabbitMQ (the broker-cluster tests) and socat
# (pseudo-terminal pairs for the serial tests). Installed with apt-get when we
# may (root, as in CI); otherwise we say exactly what will not run.
sysdeps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto mosquitto-clients"; \
	command -v socat >/dev/null 2>&1 || missing="$$missing socat"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing$$missing with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "make: WARNING:$$missing not installed and I may not install it (not root, or no apt-get)."; \
	    echo "      Install it with: sudo apt-get install$$missing"; \
	  fi; \
	fi

# The guardrails: lint and format (ruff), types (mypy: strict for the wire, the models, the strategies and the
# config loader), the layer contracts between the top-level packages (import-linter, .importlinter), and no
# function over 60 lines in the services (tools/function_length.py).
check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python tools/function_length.py --max 60 edge aggregator

# Without a mosquitto binary the broker tests cannot run: we say which, and run the rest.
test: venv sysdeps
	@skip=""; \
	if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then skip="broker"; fi; \
	if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then skip="$${skip:+$$skip or }rabbitmq"; fi; \
	if [ -z "$$skip" ]; then \
	  $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); \
	else \
	  echo "make: a broker is missing: NOT running these tests ($$skip):"; \
	  $(BIN)/python -m pytest -q --collect-only -m "($$skip) and not slow" | grep '::' || true; \
	  $(BIN)/python -m pytest $(XDIST) -m "not ($$skip) and not slow" $(PYTEST_ARGS); \
	fi

test-slow: venv sysdeps
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: venv sysdeps
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

demo: venv sysdeps
	$(BIN)/fedline demo $(DEMO_ARGS)

# The second recipe: NASA C-MAPSS FD001 (data/README.md) through the bring-your-own-CSV path: four plants of
# unequal size, remaining useful life (RUL) regression, held-out rows grouped by engine.
CMAPSS_FEATURES := s2,s3,s4,s7,s8,s9,s11,s12,s13,s14,s15,s17,s20,s21
demo-cmapss: venv sysdeps
	$(BIN)/fedline demo --csv data/cmapss_fd001.csv --site-column plant --label RUL --task regression \
	  --group-column unit --features $(CMAPSS_FEATURES) --report demo-report-cmapss $(DEMO_ARGS)

bench: venv sysdeps
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# coverage-guided fuzzing of every decoder (atheris); FUZZ_ARGS e.g. --runs 200000
fuzz: venv
	$(BIN)/python fuzz/run.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) demo-report demo-report-cmapss .fedline-run .pytest_cache .hypothesis
