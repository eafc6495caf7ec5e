# The two commands of the README:
#   make main   set up .venv (if missing), get Fashion-MNIST, run the quick comparison with `mlflow run`
#   make test   set up .venv (if missing), run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The main job: lr-decay against its noise-matched twin on Fashion-MNIST (README, "The main job").
EXPERIMENT ?= quick-fashion-mnist
EPOCHS ?= 10
MLFLOW_RUN := mlflow run . --env-manager local --experiment-name $(EXPERIMENT)

.PHONY: setup data main test constraints ui repro-fashion-mnist bench gpu-check gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	python -m growing_batch.data --dataset fashion_mnist

main: data
	$(MLFLOW_RUN) -P schedule=lr-decay -P epochs=$(EPOCHS)
	$(MLFLOW_RUN) -P schedule=noise-matched -P epochs=$(EPOCHS)
	python -m growing_batch.analysis --experiment_name $(EXPERIMENT)

# The reproduction's four presets in full (150 epochs each) on Fashion-MNIST, SEEDS seeds each, as one
# sweep, for the README's table (about 35 min per seed on a 2-core CPU).
REPRO_EXPERIMENT ?= repro-fashion-mnist
SEEDS ?= 3
repro-fashion-mnist: data
	mlflow run . --env-manager local --experiment-name $(REPRO_EXPERIMENT) -e sweep \
	  -P experiment=repro -P seeds=$(SEEDS) -P dataset=fashion_mnist

# The loop against plain Keras fit (docs/performance.md); QUICK=true for smaller sizes (minutes).
QUICK ?= false
bench: setup
	mlflow run . --env-manager local --experiment-name bench -e bench -P output=$(CURDIR)/bench.json -P quick=$(QUICK)

# The GPU check (docs/jax.md): the JAX bench and the paper's WRN-16-4 presets timed against Keras fit
# on synthetic CIFAR-shaped data, one JSON line per measurement (no data set needed). QUICK=true: 10,000 images.
gpu-check: setup
	python -m growing_batch.gpu_check --quick $(QUICK) --output $(CURDIR)/gpu-check.jsonl

# For a GPU machine without network (Python 3.12 with JAX): the wheels it lacks, into .whl/, for
# scripts/gpu_check_on_device.sh there.
gpu-wheels: setup
	python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl -r scripts/gpu-check-wheels.txt

test: setup
	python -m pytest

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db

# Regenerate the full pin list after changing a pin in pyproject.toml and conda.yaml.
constraints: setup
	{ echo '# The whole environment that `make setup` installs (pip freeze of .venv; regenerate with `make constraints`).'; \
	  python -m pip freeze --exclude-editable; } > constraints.txt
