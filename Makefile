# cappa-pipeline: every target depends on `install`, which builds .venv once (a no-op when nothing
# changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# Pass-through options: `make train ARGS="--epochs 1"` for one stage; for `make all`, per stage:
# `make all FETCH_ARGS="--count 500" TRAIN_ARGS="--epochs 1"` (ENCODE_ARGS, EVAL_ARGS likewise).
ARGS ?=
FETCH_ARGS ?=
ENCODE_ARGS ?=
TRAIN_ARGS ?=
EVAL_ARGS ?=

.PHONY: install test test-fast all fetch encode train eval status bench clean gpu-check
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

# The unit tier: no test that fetches, encodes, trains or starts a process (tests/conftest.py marks
# the others slow).
test-fast: install
	$(PY) -m pytest -m "not slow and not cuda"

fetch: install
	$(PY) -m pipeline fetch $(FETCH_ARGS) $(ARGS)

encode: install
	$(PY) -m pipeline encode $(ENCODE_ARGS) $(ARGS)

# --resume: a rerun continues the run (or finds it finished) instead of refusing to overwrite it.
train: install
	$(PY) -m pipeline train --resume $(TRAIN_ARGS) $(ARGS)

eval: install
	$(PY) -m pipeline eval $(EVAL_ARGS) $(ARGS)

status: install
	$(PY) -m pipeline status

bench: install
	$(PY) -m pipeline bench $(ARGS)

# eval runs last, so the final line `make all` prints is where the report is.
all: install
	$(MAKE) fetch ARGS=
	$(MAKE) encode ARGS=
	$(MAKE) train ARGS=
	$(PY) -m pipeline status
	$(MAKE) --no-print-directory eval ARGS=

clean:
	rm -rf data/shards data/synthetic cache/features.zarr cache/runs

# On a machine with a CUDA GPU: cuda tests, the rest of the suite, a small `make all` on CUDA in a
# temporary folder and `make bench --device cuda`, with one summary (scripts/gpu_check.sh; --dry-run
# prints the plan).
gpu-check: install
	scripts/gpu_check.sh $(ARGS)
