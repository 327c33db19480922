# Two entry points: `make demo` (a short real training run) and `make test` (the test suite).
# Both create .venv on first use and install nnperf into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nnperf-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install demo test test-all tensorboard fashion-mnist clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's package; install it when it is missing and apt can.
fashion-mnist:
	@test -d $(FASHION_MNIST) || { \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	|| { echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist, or put its IDX files in data/"; exit 1; }

demo: $(STAMP) fashion-mnist
	$(BIN)/nnperf train --config configs/demo.yaml --report
	@echo "run directory: runs/demo (report.html, plots/); re-evaluate: $(BIN)/nnperf test runs/demo"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

# TensorBoard on every run trained with --tensorboard (events in runs/*/tb).
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf runs build src/*.egg-info .pytest_cache
