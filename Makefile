# tokenmeter - `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RECONCILE_ARGS ?=
# The demo application keeps tokenmeter's data (SQLite ledger, spool) in the repository's var/.
export TOKENMETER_DATA_DIR ?= $(CURDIR)/var

.DEFAULT_GOAL := help
.PHONY: help setup chromium wrk demo test lint migrate check-usage bench reconcile compat compat-lowest mutation worker beat api sandbox clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Editable install in setuptools' "strict" mode: a link tree laid out exactly as the wheel
# (instrumentation/ -> tokenmeter/, ...), which mypy and pytest see like any installed package.
# Adding or removing a file of the library re-links it (the folders are prerequisites).
LIB_DIRS := instrumentation instrumentation/migrations instrumentation/migrations/versions reporting sandbox

$(STAMP): pyproject.toml $(addsuffix /.,$(LIB_DIRS))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" --config-settings editable_mode=strict
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install tokenmeter with its dev extras

demo: setup ## The whole thing offline: sandbox, worker+beat, commissions, a scan, usage report
	$(PY) -m tasks.demo

test: setup chromium ## Run the whole test suite (SQLite, PostgreSQL, Redis, chromium)
	$(PY) -m pytest $(PYTEST_ARGS)

# $(call apt_install,<package>,<why>,<what to say when it cannot install>,<then, e.g. exit 2;>)
define apt_install
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(1) ($(2))"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
	  else \
	    echo "$(3)" >&2; $(4) \
	  fi; }
endef

chromium: ## Install Debian's chromium for the dashboard test when it is missing (as root)
	$(call apt_install,chromium,the dashboard test renders the page in it,the dashboard test needs chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu),exit 2;)

wrk: ## Install Debian's wrk for bench/api.py when it is missing (as root; else its rows are skipped)
	$(call apt_install,wrk,bench/api.py's C load generator,bench/api.py measures with wrk too: 'sudo apt-get install wrk' (its rows are skipped),)

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

migrate: setup ## Create/upgrade the demo app's database (tokenmeter's ledger + the app's tables)
	$(PY) -m models.migrate

check-usage: setup ## Usage of the last 7 days by model (ARGS="--by task --since 30d")
	$(VENV)/bin/tokenmeter check-usage $(ARGS)

bench: setup wrk ## Per task and call vs OpenTelemetry and the least capture, peers, throughput, writer, API, reports -> bench/RESULTS.md
	$(PY) -m pip install --quiet -e ".[dev,bench]" --config-settings editable_mode=strict
	$(PY) bench/per_task.py --results bench/RESULTS.md
	$(PY) bench/capture_floor.py --results bench/RESULTS.md
	$(PY) bench/peers.py --results bench/RESULTS.md
	$(PY) bench/writer.py --results bench/RESULTS.md
	$(PY) bench/throughput.py --results bench/RESULTS.md
	$(PY) bench/throughput.py --latency-ms 200 --tasks 60 --rounds 2 --results bench/RESULTS.md
	$(PY) bench/spool_replay.py --results bench/RESULTS.md
	$(PY) bench/api.py --results bench/RESULTS.md
	$(PY) bench/report_queries.py --rows 1000000 --results bench/RESULTS.md
	$(PY) bench/report_queries.py --rows 10000000 --repeat 3 --results bench/RESULTS.md

reconcile: setup ## Real workers, ledger vs ground truth; RECONCILE_ARGS="--faults --chaos 200"
	$(PY) bench/reconcile.py $(RECONCILE_ARGS)

compat: setup ## The lowest and latest versions every declared range allows (nox sessions)
	$(VENV)/bin/nox

compat-lowest: setup ## Only the lowest versions (unit and capture tests)
	$(VENV)/bin/nox -s lowest

MUTATION_VENV := .venv-mutation
MUTATION_TARGETS ?= pricing maintained sink
mutation: setup ## Mutation testing of pricing and flush (cosmic-ray, about an hour) -> var/mutation-*.html
	@test -x $(MUTATION_VENV)/bin/cosmic-ray || { $(PYTHON) -m venv $(MUTATION_VENV) && \
	  $(MUTATION_VENV)/bin/pip install --quiet "cosmic-ray>=8.4,<9"; }
	@mkdir -p var
	@for target in $(MUTATION_TARGETS); do \
	  cfg=tests/mutation-$$target.toml; db=var/mutation-$$target.sqlite; \
	  $(MUTATION_VENV)/bin/cosmic-ray init $$cfg $$db --force && \
	  $(MUTATION_VENV)/bin/cr-filter-operators $$db $$cfg && \
	  $(MUTATION_VENV)/bin/cr-filter-pragma $$db && \
	  $(MUTATION_VENV)/bin/cosmic-ray baseline $$cfg && \
	  $(MUTATION_VENV)/bin/cosmic-ray exec $$cfg $$db && \
	  $(MUTATION_VENV)/bin/cr-html $$db > var/mutation-$$target.html && \
	  $(MUTATION_VENV)/bin/cr-report $$db --surviving-only --show-diff | tail -n 60 || exit 1; \
	done

worker: setup migrate ## Celery worker with beat (real OpenAI/Reddit with their env vars)
	$(VENV)/bin/celery -A tasks worker --beat -l INFO

beat: setup ## Celery beat alone (when workers run without --beat)
	$(VENV)/bin/celery -A tasks beat -l INFO

api: setup ## Usage HTTP API + dashboard on :8000 (needs TOKENMETER_API_TOKEN; ARGS=--no-auth)
	$(VENV)/bin/tokenmeter api $(ARGS)

sandbox: setup ## The loopback OpenAI and Reddit sandboxes in the foreground
	$(VENV)/bin/tokenmeter sandbox

clean: ## Remove the venvs and generated data
	rm -rf $(VENV) $(MUTATION_VENV) .nox build var .pytest_cache .mypy_cache .ruff_cache
