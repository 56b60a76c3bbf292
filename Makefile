# Every target runs offline: nothing here may reach a model hub.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup test demo bench bench-short lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this release (and its torchvision) install from local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench.py

# A few minutes on CPU (256x256, 4 steps, 1 repeat); `make bench` is the full run.
bench-short: $(STAMP)
	$(PY) scripts/bench.py --short

lint: $(STAMP)
	$(PY) -m compileall -q ldm scripts tests

clean:
	rm -rf $(VENV) .pytest_cache
