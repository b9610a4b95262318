# One virtualenv for every target.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL_DIR ?= models
export MODEL_DIR

.PHONY: run test model bench bench-backpressure bench-recovery broker install browser clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(PY) -m app.cli train --if-missing --model-dir $(MODEL_DIR)

run: model
	$(PY) -m app.cli run

# Debian's chromium for the dashboard test; installed here so a fresh machine needs nothing else.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

test: model browser
	$(PY) -m pytest -q

# Just the embedded broker (prints BROKER_URL); Ctrl-C stops it.
broker: $(STAMP)
	$(PY) -m app.cli broker

bench: model
	$(PY) -m bench.run

bench-backpressure: model
	$(PY) -m bench.run --backpressure

bench-recovery: model
	$(PY) -m bench.run --recovery

clean:
	rm -rf $(VENV) data models test-artifacts
