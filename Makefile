# lipsync-cluster: the two commands a new user needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_models
GPUS ?= 0
PER_GPU ?= 2
METRICS_PORT ?= 5558
# The ONNX Runtime flavour: gpu where nvidia-smi answers, else cpu (override: make run RUNTIME=cpu).
RUNTIME ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# What each target installs (setup.cfg's extras; README "Install"): `run` what README's commands after
# `make run` need (loadtest --plot: plot; gateway: gateway and webrtc). `test` holds everything (CPU runtime).
RUN_EXTRAS := $(RUNTIME),tools,console,plot,gateway,webrtc
TEST_EXTRAS := test
STAMP_RUN := $(VENV)/.installed-run-$(RUNTIME)
STAMP := $(VENV)/.installed-test-$(RUNTIME)
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: an environment keeps one.
ifeq ($(RUNTIME),gpu)
ORT_WANT := onnxruntime-gpu
ORT_OTHER := onnxruntime
ORT_SPEC := onnxruntime-gpu[cuda,cudnn]>=1.17
else
ORT_WANT := onnxruntime
ORT_OTHER := onnxruntime-gpu
ORT_SPEC := onnxruntime>=1.17
endif

.PHONY: venv test test-fast test-install run bench demo clean browser-deps speech-deps

# $(1): the extras to install into .venv (made on first use; pip's cache keeps it quick after that).
define install_extras
	@$(PY) -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[$(1)]'
	@if $(BIN)/pip show -q $(ORT_OTHER) >/dev/null 2>&1; then \
	  echo "replacing $(ORT_OTHER) with $(ORT_WANT) (both install the onnxruntime module)"; \
	  $(BIN)/pip uninstall --quiet -y onnxruntime onnxruntime-gpu && $(BIN)/pip install --quiet '$(ORT_SPEC)'; fi
	@touch $@
endef

$(STAMP): setup.cfg pyproject.toml
	$(call install_extras,$(TEST_EXTRAS))

$(STAMP_RUN): setup.cfg pyproject.toml Makefile
	$(call install_extras,$(RUN_EXTRAS))

venv: $(STAMP)

# The browser test drives Debian's chromium; without it that one test is skipped, saying why.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium could not be installed: tests/test_browser.py will be skipped"

# The Pipecat test speaks with Debian's espeak-ng (real speech, no model); without it that test is skipped.
speech-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } || echo "espeak-ng could not be installed: tests/test_pipecat.py will be skipped"

# Test runs keep compiled modules (__pycache__/, git-ignored) even where the environment sets
# PYTHONDONTWRITEBYTECODE: otherwise every xdist worker and every worker process a test starts
# compiles the package again, and pytest rewrites every test module's asserts again (docs/BENCHMARKS.md
# "test-fast": a first run and a rerun).
KEEP_PYC := PYTHONDONTWRITEBYTECODE=

# Both tiers: the in-process tests and the ones that start processes (`processes` marker).
test: $(STAMP) browser-deps speech-deps
	$(KEEP_PYC) $(BIN)/python -m pytest -q tests

# The in-process tier alone: no cluster, subprocess or browser (README "The two commands"), on
# FAST_JOBS pytest-xdist workers: two per core (up to 8), since the tier's tests spend about a third
# of their time waiting on sockets and timers, and a second worker per core runs meanwhile (on 2
# cores, bench/test_tiers.py --jobs N: 4 workers 41-53 s, 3 46-47 s, 2 58-60 s; docs/BENCHMARKS.md
# "test-fast"). Each test file stays on one worker, so its module fixtures are built once; the
# longest files start first (tests/file_order.py). tests/process_guard.py fails an unmarked test that starts a process.
FAST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n * 2 > 8 ? 8 : n * 2 )))
test-fast: $(STAMP)
	$(KEEP_PYC) $(BIN)/python -m pytest -q -m "not processes" -n $(FAST_JOBS) --dist loadfile --no-loadscope-reorder tests

# A plain `pip install .` (no extras) in a fresh virtualenv: a working Client against a running
# cluster, no onnxruntime or cv2, under 100 MB. Also part of `make test` (tests/test_install.py).
test-install: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_install.py

$(DEMO_DIR)/cluster.yaml: | $(STAMP_RUN)
	$(BIN)/lipsync-cluster demo-models $(DEMO_DIR) --count 3 --kind light

demo: $(DEMO_DIR)/cluster.yaml

run: $(STAMP_RUN) $(DEMO_DIR)/cluster.yaml
	$(BIN)/lipsync-cluster start --config $(DEMO_DIR)/cluster.yaml --gpus $(GPUS) --per-gpu $(PER_GPU) --metrics-port $(METRICS_PORT)

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/pipeline.py --stages
	$(BIN)/python bench/broker.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/routing.py
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/stream.py
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
