# Two commands for a newcomer: `make run` (set up + dvc repro on the demo) and `make test`.
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml or
# requirements.lock change, and `dvc repro` re-runs only the stages whose inputs changed.

VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
PYTHON ?= python3

# dvc.yaml's commands (`tympan <stage>`) must resolve to this environment.
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns.db

.PHONY: setup remote run test lint

setup: $(STAMP)

# The default DVC remote `local` (.dvc/config) on this machine: a folder beside the project,
# in .dvc/config.local. Not committed: a clone elsewhere cannot reach that folder, so there
# `dvc pull` fails with "remote 'local' doesn't exist" until it is told where the data is
# (README, "What a clone can pull").
remote:
	@dvc remote list | grep -qE '^local[[:space:]]' || \
		dvc remote add --local local ../tympan-dvc-remote

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

run: setup remote
	dvc repro
	tympan summary

test: setup
	pytest

lint: setup
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
