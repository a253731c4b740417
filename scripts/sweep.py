"""A grid of flow trainings (λ × r × learning rate × seeds) as one sharded, resumable program.

  python scripts/sweep.py --config=configs/sweep_tail_weight.py --workdir=runs/sweep_lambda
  python scripts/sweep.py --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k

Logic lives in `tailjax.sweep.run_and_evaluate`; this file only parses flags.
Multi-host: pass `--distributed` on every host (calls `jax.distributed.initialize()`).
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs` imports each other

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep_tail_weight.py", "Sweep config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/sweep_lambda", "Run directory (resumed if it exists).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (one process per host).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from tailjax import sweep
  sweep.run_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
