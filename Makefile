# probewatch developer entry points. `make demo` and `make test` are the two README commands.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
# Absolute, for the deploy scripts' readiness probes (kafka-python).
export PYTHON := $(CURDIR)/$(PY)
LOCAL := deploy/local
PYTEST_ARGS ?=

# The integration tests find the services started by deploy/local/services.sh here.
export PROBEWATCH_TEST_KAFKA ?= 127.0.0.1:19092
export PROBEWATCH_TEST_CLICKHOUSE ?= 127.0.0.1:19000
export PROBEWATCH_TEST_ALERTMANAGER ?= http://127.0.0.1:19093
export PROBEWATCH_TEST_WEBHOOK_PORT ?= 19080

# In CI every run starts from empty service data (same result on a reused machine).
FRESH := $(if $(filter true 1,$(CI)),--fresh,)

.PHONY: help venv demo services-up services-down services-status lint test test-unit bench

help:
	@echo "make demo           create .venv and run probewatch on examples/sample-logs.jsonl.gz (no servers)"
	@echo "make test           venv, start Kafka/ClickHouse/Alertmanager, ruff + mypy, pytest, stop services"
	@echo "make test-unit      pytest -m 'not integration' (no services)"
	@echo "make lint           ruff check . and mypy"
	@echo "make services-up    install (if needed) and start the local services; services-down stops them"
	@echo "make bench          run the scripts in benchmarks/"
	@echo "make venv           create/update .venv (deploy/local/bootstrap.sh)"

venv:
	@bash $(LOCAL)/bootstrap.sh

demo: venv
	$(VENV)/bin/probewatch run --input examples/sample-logs.jsonl.gz --alerts-out probewatch-alerts.jsonl

services-up: venv
	@bash $(LOCAL)/services.sh up

services-down:
	@bash $(LOCAL)/services.sh down

services-status:
	@bash $(LOCAL)/services.sh status

# Both linters always run; the target fails when either does.
lint: venv
	@set +e; rc=0; \
	echo "$(VENV)/bin/ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "$(VENV)/bin/mypy"; $(VENV)/bin/mypy || rc=1; \
	exit $$rc

# Services are stopped whatever happens (trap). Lint does not stop the tests from running,
# but a lint failure fails the target. Exit code: pytest's (5 "no tests collected" counts as
# a failure), else lint's.
test: venv
	@set +e; \
	trap 'bash $(LOCAL)/services.sh down' EXIT; trap 'exit 130' INT TERM; \
	bash $(LOCAL)/services.sh up $(FRESH) || { echo "make test: starting the services failed" >&2; exit 1; }; \
	echo "==> lint"; \
	$(MAKE) --no-print-directory lint; lint_rc=$$?; \
	echo "==> pytest $(PYTEST_ARGS)"; \
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; rc=1; fi; \
	if [ $$rc -eq 0 ] && [ $$lint_rc -ne 0 ]; then echo "make test: tests passed but lint failed" >&2; rc=$$lint_rc; fi; \
	exit $$rc

test-unit: venv
	@set +e; \
	$(VENV)/bin/pytest -m "not integration" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-unit: pytest collected no tests: failing" >&2; rc=1; fi; \
	exit $$rc

bench: venv
	@shopt -s nullglob; scripts=(benchmarks/*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no benchmarks/*.py to run"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "==> $$s"; $(PY) "$$s"; done
