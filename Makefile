# The README's commands: `make demo` (set up + run the main job), `make test` (set up + run CI's tests) and
# `make test-all` (every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.carefed-installed

.PHONY: demo test test-all lint chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/carefed simulate

# CI's suite: every test but the `long` end-to-end variants (pyproject.toml's markers), to stay under 30 minutes.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -m "not long"

# Everything, the long variants included (about 12 minutes more here).
test-all: $(STAMP) chromium
	$(BIN)/python -m pytest

# The report test renders report.html in headless Chromium (Debian's package). Installed when missing and we can.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "warning: chromium is missing; install it (apt-get install chromium) for the report test"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
