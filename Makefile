# `make run` and `make test` work on a fresh machine with only Python 3.11 + pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install lint compile image push clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changes. torch is installed first and pinned exactly:
# an open range would pull a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dpoflow run

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests

# the compiled pipeline and components (committed; a test fails when they drift from the code)
compile: $(STAMP)
	$(BIN)/dpoflow compile

# the image every step runs in (needs a container engine; not built in CI)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= dpoflow/dpoflow:$(VERSION)
image:
	docker build -f components/Dockerfile -t $(IMAGE) .

push: image
	docker push $(IMAGE)

clean:
	rm -rf outputs .pytest_cache
