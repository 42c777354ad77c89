# burnguard: `make demo` runs the pipeline end to end, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format venv system-deps system-deps-demo kafka-jars collector subscriber go-programs clean

#: The native decoder's crate (contracts/native): the editable install builds it, so a change rebuilds.
NATIVE_SOURCES := contracts/native/Cargo.toml contracts/native/Cargo.lock $(wildcard contracts/native/src/*.rs)

# The environment is rebuilt only when pyproject.toml or the native crate changes.
$(STAMP): pyproject.toml $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	# the native build is optional: one that fails must not leave the last build in use (stale rules)
	rm -f contracts/_otlp_native.*.so
	$(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package burnguard -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# System packages, installed with apt when missing (deploy/system-deps.sh): Java 17, Maven and
# python3-venv; for the tests also Chromium, and a check that Go is there to build the Go programs.
system-deps:
	bash deploy/system-deps.sh test

system-deps-demo:
	bash deploy/system-deps.sh demo

# Resolve the pinned Apache Kafka jars from Maven Central (cached under ~/.cache/burnguard).
kafka-jars: venv
	$(BIN)/python -c "from burnguard.deploy.kafka import kafka_classpath; kafka_classpath()"

# The OpenTelemetry Collector distribution in deploy/collector, built from the Go module proxy once
# per source hash into ~/.cache/burnguard/collector/<hash>/collector (prints the path).
collector: venv
	$(BIN)/python -m burnguard.deploy.gobuild collector

# The Go signal subscriber example in examples/signal-subscriber, cached the same way.
subscriber: venv
	$(BIN)/python -m burnguard.deploy.gobuild subscriber

# Both, before pytest: a fresh machine's first Collector build takes minutes, more than a test's timeout.
go-programs: venv
	$(BIN)/python -m burnguard.deploy.gobuild collector subscriber

demo: system-deps-demo venv kafka-jars
	$(BIN)/burnguard demo

# BURNGUARD_NATIVE_REQUIRED=1: the native decoder missing fails its half of the tests (locally it skips).
# Three test processes, a module's tests in one (module fixtures start once): the suite mostly waits.
test: system-deps venv kafka-jars go-programs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	BURNGUARD_NATIVE_REQUIRED=1 $(BIN)/pytest -q -n 3 --dist loadfile --durations=40

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .burnguard .pytest_cache contracts/native/target contracts/_otlp_native.*.so
