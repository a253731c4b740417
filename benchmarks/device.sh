#!/usr/bin/env bash
# GPU run in one command: the micro-benchmarks (train step, sweep, per-patch gradients),
# then the main job (make demo's config, every row of a category vmapped into one
# program) timed by phase and compared with the CPU run, then the study if asked:
#   -> benchmarks/results-<device>.md, benchmarks/results-study-<device>-<config>.md
#
#   bash benchmarks/device.sh                  # a machine with network: jax[cuda12] into .venv
#   TAILJAX_PYTHON=python3 TAILJAX_WHEELS=.device-wheels bash benchmarks/device.sh
#                                              # offline (the lent GPU machines): the image's
#                                              # Python with CUDA JAX, plus wheels carried in
#                                              # (`make device-wheels` here)
#
# Options (environment): TAILJAX_REFERENCE=runs/demo (the CPU run to compare with; carry it),
# TAILJAX_STUDY=1 (also configs/fastflow_study.py against TAILJAX_STUDY_REFERENCE=runs/study,
# then the study with 8 coupling steps and 5 seeds, configs/fastflow_study.py:arch8, which
# the 2-core CPU cannot run within its 100 min: -> runs/study-arch8-5seeds/report.md),
# TAILJAX_SKIP_MICRO=1 (skip the micro-benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TAILJAX_PYTHON:-}"
if [ -z "$PY" ]; then
  make install
  .venv/bin/python -m pip install --quiet -U "jax[cuda12]"
  .venv/bin/python -m pip install --quiet -e ".[peer]" || echo "peer extra not installed: the PyTorch columns will be skipped"
  PY=.venv/bin/python
elif [ -n "${TAILJAX_WHEELS:-}" ]; then
  # Only what the image lacks, from the carried wheels, into a folder on PYTHONPATH.
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$TAILJAX_WHEELS" \
      --target .device-site "$TAILJAX_WHEELS"/*.whl
  export PYTHONPATH="$(pwd)/.device-site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
# float32 matrix products as on the CPU (not TF32), so the records can be compared.
export JAX_DEFAULT_MATMUL_PRECISION="${JAX_DEFAULT_MATMUL_PRECISION:-highest}"
"$PY" -c "import jax; print('devices:', jax.devices())"
if [ -z "${TAILJAX_SKIP_MICRO:-}" ]; then
  "$PY" -m benchmarks.device_report "$@"
fi
"$PY" -m benchmarks.bench_study --config=configs/fastflow_textures.py \
    --reference="${TAILJAX_REFERENCE:-runs/demo}" --overwrite
if [ -n "${TAILJAX_STUDY:-}" ]; then
  "$PY" -m benchmarks.bench_study --config=configs/fastflow_study.py \
      --reference="${TAILJAX_STUDY_REFERENCE:-runs/study}" --overwrite
  "$PY" -m tailjax.cli train --config=configs/fastflow_study.py:arch8 --config.num_seeds=5 \
      --config.train.row_mode=vmap --workdir=runs/study-arch8-5seeds
fi
