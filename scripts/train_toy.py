"""Train a coupling flow on a toy two-moons feature-map density (see configs/toy_flow.py)."""

from absl import app, flags, logging
from ml_collections import config_flags

from tailjax import toy

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy_flow.py", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/toy", "Run directory (resumed if it exists).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  toy.run_toy(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
