"""Study B diagnosis entry point (see configs/mil_diagnosis.py for the command).

  python scripts/diagnose_mil.py --config=configs/mil_diagnosis.py --workdir=runs/mil [--restart | --branch]
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from tailjax import runrecord
from tailjax.studies import mil_diagnosis

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (results.json, report.md, figures).")
_RESTART = flags.DEFINE_bool("restart", False, "The workdir ran another config: discard its results.")
_BRANCH = flags.DEFINE_bool("branch", False, "The workdir ran another config: run in <workdir>-<hash>.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _RESTART.value and _BRANCH.value:
    raise app.UsageError("--restart and --branch exclude each other")
  on_change = "restart" if _RESTART.value else "branch" if _BRANCH.value else "error"
  try:
    results = mil_diagnosis.run_diagnosis(_CONFIG.value, _WORKDIR.value, on_change=on_change)
  except (runrecord.ConfigMismatchError, runrecord.ConfigFieldError, runrecord.WorkdirLockedError) as e:
    raise SystemExit(f"error: {e}") from None
  print("\n".join(results["answer_text"]))
  print(f"\nreport: {results['workdir']}/report.md  (wall time {results['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
