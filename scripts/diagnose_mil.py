"""Study B diagnosis entry point (see configs/mil_diagnosis.py for the command).

  python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py --workdir=runs/mil
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from tailjax import mil_train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results.json, report.md, figure).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  results = mil_train.run_diagnosis(_CONFIG.value, _WORKDIR.value)
  print("\n".join(results["answer_text"]))
  print(f"\nreport: {_WORKDIR.value}/report.md  (wall time {results['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
