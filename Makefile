# `make test` and `make demo` are the two commands in the README; both find or start RabbitMQ and
# Redis through mesh/devservices.py (private ones live under .mesh/, `make stop-services` ends them).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(BIN)/python -m mesh.devservices

.PHONY: install lint test demo services stop-services clean

install: $(STAMP)

# Reinstalls only when the package metadata changes; the editable install follows code edits.
$(STAMP): pyproject.toml setup.cfg
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; \
	  else \
	    echo "$(PYTHON) cannot create virtual environments: run 'sudo apt-get install python3-venv'" >&2; \
	    exit 1; \
	  fi; \
	fi
	@# A half-made venv (no pip) from an interrupted run is rebuilt rather than trusted.
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check mesh behaviours tests bench examples
	$(BIN)/mypy

test: install lint
	$(DEV) exec -- $(BIN)/python -m pytest -q

demo: install
	$(DEV) exec -- $(BIN)/mesh up examples/demo/mesh.yaml

services: install
	$(DEV) start

stop-services: install
	$(DEV) stop

# Stops private services first: deleting .mesh/ under a running broker would orphan it.
clean:
	@if [ -x $(BIN)/python ]; then $(DEV) stop; fi
	rm -rf $(VENV) .mesh .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
