"""Study A: train mean-only and tail-aware flows, evaluate, write the report.

  python scripts/train_flow.py --config=configs/fastflow_textures.py --workdir=runs/demo

Logic lives in `tailjax.study_a.train_and_evaluate`; this file only parses flags.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs` imports each other

from tailjax import study_a  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fastflow_textures.py", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory (resumed if it exists).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  study_a.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
