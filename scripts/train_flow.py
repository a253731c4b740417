"""Study A: train mean-only and tail-aware flows, evaluate, analyse, write the report.

  python scripts/train_flow.py --config=configs/fastflow_textures.py --workdir=runs/demo

Logic lives in `tailjax.study_a.train_and_evaluate` and
`tailjax.analysis.report.analyze_run`; this file only parses flags.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `configs` imports each other

from tailjax import study_a  # noqa: E402
from tailjax.analysis import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fastflow_textures.py", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory (resumed if it exists).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  study_a.train_and_evaluate(cfg, workdir)
  if cfg.get("analysis") and cfg.analysis.enabled:
    out = report.analyze_run(workdir, num_images=cfg.analysis.num_images,
                             num_param_images=cfg.analysis.num_param_images,
                             sweeps=cfg.analysis.sweeps or None)
    report.append_to_report(workdir, out)
    print("\n".join(report.summary_table(out)))


if __name__ == "__main__":
  app.run(main)
