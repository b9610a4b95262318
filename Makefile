# One virtualenv for every target.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL_DIR ?= models
export MODEL_DIR

.PHONY: run test fuzz chaos model bench bench-backpressure bench-recovery bench-scale bench-failover bench-standby broker install browser promtool stunnel clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(PY) -m app.cli train --if-missing --model-dir $(MODEL_DIR)

# Extra arguments of `scoring run`, e.g. `make run ARGS=--generate` (generators into a BROKER_URL
# cluster, which gets none by default) or `ARGS="--no-generate"`.
ARGS ?=
run: model
	$(PY) -m app.cli run $(ARGS)

# Debian's chromium for the dashboard test; installed here so a fresh machine needs nothing else.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# Debian's prometheus: promtool checks the alert rules, and one test scrapes a worker with it.
promtool:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus)

# Debian's stunnel4 (+ openssl): tests/test_security.py terminates TLS before the embedded broker.
stunnel:
	@command -v stunnel >/dev/null && command -v openssl >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends stunnel4 openssl)

test: model browser promtool stunnel
	$(PY) -m pytest -q

# The property-based hostile-input tests with many more generated records than `make test` runs.
fuzz: model
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_hostile_input.py

# The crash soak: both pipelines under load, at least 20 SIGKILLs, wipes, joins, refused outputs.
chaos: model
	$(PY) -m tests.chaos

# Just the embedded broker (prints BROKER_URL); Ctrl-C stops it.
broker: $(STAMP)
	$(PY) -m app.cli broker

bench: model
	$(PY) -m bench.run

bench-backpressure: model
	$(PY) -m bench.run --backpressure

bench-recovery: model
	$(PY) -m bench.run --recovery

bench-scale: model
	$(PY) -m bench.run --scale

bench-failover: model
	$(PY) -m bench.run --failover

bench-standby: model
	$(PY) -m bench.run --standby

clean:
	rm -rf $(VENV) data models test-artifacts
