# tailjax: every target sets up its own virtualenv on first use (Python 3.10+ and pip only).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tailjax-installed
PYTEST_ARGS ?=

.PHONY: install demo test toy bench mil ablations clean

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

## Study A ablations (λ grid and r grid, 3 seeds, all texture categories), then the analysis with H4.
ablations: $(STAMP)
	$(BIN)/python scripts/sweep.py --config=configs/sweep_tail_weight.py --workdir=runs/sweep_lambda
	$(BIN)/python scripts/sweep.py --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k
	$(BIN)/python scripts/analyze.py --workdir=runs/demo --sweeps=runs/sweep_lambda,runs/sweep_top_k

## Speed benchmarks -> benchmarks/results.md (~3-5 min on 2 cores; not part of the tests)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

toy: $(STAMP)
	$(BIN)/python scripts/train_toy.py --config=configs/toy_flow.py --workdir=runs/toy

clean:
	rm -rf $(VENV) runs .pytest_cache
