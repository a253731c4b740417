# tailjax: every target sets up its own virtualenv on first use (Python 3.10+ and pip only).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tailjax-installed
PYTEST_ARGS ?=

.PHONY: install demo test toy bench mil clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## The main job (see README): study A on the embedded texture benchmark -> runs/demo/report.md
demo: $(STAMP)
	$(BIN)/python scripts/train_flow.py --config=configs/fastflow_textures.py --workdir=runs/demo

## The test suite.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Study B: the attention-MIL diagnosis -> runs/mil/report.md (~4-8 min on 2 cores)
mil: $(STAMP)
	$(BIN)/python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py --workdir=runs/mil

toy: $(STAMP)
	$(BIN)/python scripts/train_toy.py --config=configs/toy_flow.py --workdir=runs/toy

clean:
	rm -rf $(VENV) runs .pytest_cache
