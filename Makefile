# One entry point for people and CI. `make run` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Empty TORCH_REQ skips the pinned CPU torch (a CUDA cluster installs its own torch first).
TORCH_REQ ?= requirements/torch-cpu-dev.txt
PACKAGES := stages/core $(filter-out stages/core,$(patsubst %/pyproject.toml,%,$(wildcard stages/*/pyproject.toml))) flows
STAMP := $(VENV)/.interiorfusion-installed
# Khronos glTF-Validator (tools/gltf-validator, Node.js) for the .glb checks; setup skips it where npm is missing.
NPM := $(shell command -v npm 2>/dev/null)
VALIDATOR := tools/gltf-validator/node_modules/.package-lock.json
# The 3D viewer's JavaScript (tools/viewer: three.js, pinned by its lock file) bundled into core's package data.
VIEWER_BUNDLE := stages/core/src/interiorfusion_core/viewer/viewer.min.js
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench bench-readme quality images clean

setup: $(STAMP) $(if $(NPM),$(VALIDATOR) $(VIEWER_BUNDLE))

$(STAMP): $(wildcard stages/*/pyproject.toml) flows/pyproject.toml requirements/*.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(if $(TORCH_REQ),$(BIN)/python -m pip install -q -r $(TORCH_REQ))
	$(BIN)/python -m pip install -q -r requirements/dev.txt $(addprefix -e ,$(PACKAGES))
	touch $(STAMP)

$(VALIDATOR): tools/gltf-validator/package.json tools/gltf-validator/package-lock.json
	npm ci --prefix tools/gltf-validator --no-audit --no-fund --loglevel=error
	touch $(VALIDATOR)

$(VIEWER_BUNDLE): tools/viewer/package.json tools/viewer/package-lock.json tools/viewer/src/viewer.js
	npm ci --prefix tools/viewer --no-audit --no-fund --loglevel=error
	npm run --prefix tools/viewer --silent build

run: setup
	$(BIN)/interiorfusion pipeline run --config configs/smoke/pipeline.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench

# Quality runs (configs/quality/): train each suite at its real size and check its held-out targets.
quality: setup
	$(BIN)/python -m quality

# README.md's benchmark table := the last full `make bench` run's .interiorfusion/bench/results.md
bench-readme: setup
	$(BIN)/python -m bench --readme

# Stage images, built offline from a host-side wheelhouse (containers/README.md). Needs root for dockerd.
IMAGES_ARGS ?=
images: setup
	bash containers/ci-setup.sh >/dev/null
	PYTHON=$(BIN)/python containers/build.sh $(IMAGES_ARGS)

clean:
	rm -rf .interiorfusion .pytest_cache
