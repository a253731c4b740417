#!/usr/bin/env bash
# GPU readiness in one command: a Python with JAX's CUDA build, then the train-step, sweep
# and per-patch benchmarks (a few minutes on one GPU) -> benchmarks/results-<device>.md.
#
#   bash benchmarks/device.sh                    # installs jax[cuda12] into .venv first
#   TAILJAX_PYTHON=python3 bash benchmarks/device.sh   # use a Python that already has CUDA JAX
#
# With TAILJAX_PYTHON set nothing is installed (a machine without network: carry the
# missing pure-Python wheels, e.g. ml_collections and FrEIA, and put them on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TAILJAX_PYTHON:-}"
if [ -z "$PY" ]; then
  make install
  .venv/bin/python -m pip install --quiet -U "jax[cuda12]"
  .venv/bin/python -m pip install --quiet -e ".[peer]" || echo "peer extra not installed: the PyTorch columns will be skipped"
  PY=.venv/bin/python
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
"$PY" -c "import jax; print('devices:', jax.devices())"
"$PY" -m benchmarks.device_report "$@"
