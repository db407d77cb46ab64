# lipsync-cluster: the two commands a new user needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_models
GPUS ?= 0
PER_GPU ?= 2
METRICS_PORT ?= 5558

.PHONY: venv test run bench demo clean browser-deps

$(STAMP): setup.cfg pyproject.toml
	@$(PY) -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# The browser test drives Debian's chromium; without it that one test is skipped, saying why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium could not be installed: tests/test_browser.py will be skipped"

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests

$(DEMO_DIR)/cluster.yaml: | $(STAMP)
	$(BIN)/lipsync-cluster demo-models $(DEMO_DIR) --count 3 --kind light

demo: $(DEMO_DIR)/cluster.yaml

run: $(STAMP) $(DEMO_DIR)/cluster.yaml
	$(BIN)/lipsync-cluster start --config $(DEMO_DIR)/cluster.yaml --gpus $(GPUS) --per-gpu $(PER_GPU) --metrics-port $(METRICS_PORT)

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/broker.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/routing.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
