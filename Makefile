# cappa-pipeline: every target depends on `install`, which builds .venv once (a no-op when nothing changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# Pass-through knobs, e.g. `make fetch COUNT=500` or `make train ARGS="--epochs 1"`.
ARGS ?=

.PHONY: install test all fetch encode train eval status bench clean
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

fetch: install
	$(PY) -m pipeline fetch $(ARGS)

encode: install
	$(PY) -m pipeline encode $(ARGS)

train: install
	$(PY) -m pipeline train $(ARGS)

eval: install
	$(PY) -m pipeline eval $(ARGS)

status: install
	$(PY) -m pipeline status

bench: install
	$(PY) -m pipeline bench $(ARGS)

# eval runs last, so the final line `make all` prints is where the report is.
all: install
	$(MAKE) fetch
	$(MAKE) encode
	$(MAKE) train
	$(PY) -m pipeline status
	$(MAKE) --no-print-directory eval

clean:
	rm -rf data/shards data/synthetic cache/features.zarr cache/runs
