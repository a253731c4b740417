"""Study A mechanism analyses (H1, H3, H4, H7) of a finished run.

  python scripts/analyze.py --workdir=runs/demo
  python scripts/analyze.py --workdir=runs/demo --category=brick --num_images=32 \
      --sweeps=runs/sweep_r,runs/sweep_lambda

Writes <workdir>/analysis/{analysis.json, report.md, *.png} and adds the
hypothesis table to <workdir>/report.md. Logic lives in
`tailjax.analysis.report.analyze_run`; this file only parses flags.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailjax.analysis import gradients, report  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished scripts/train_flow.py workdir.", required=True)
_CATEGORY = flags.DEFINE_string("category", "", "Comma list of categories; empty = all trained ones.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Training images for H3 (input space).")
_NUM_PARAM_IMAGES = flags.DEFINE_integer(
    "num_param_images", None, "Of those, images with exact per-patch parameter gradients "
    "(default: all of them).")
_SWEEPS = flags.DEFINE_string("sweeps", "", "Comma list of directories holding a sweep's results.json.")
_METHOD = flags.DEFINE_enum("method", "jacrev", list(gradients.METHODS),
                            "Per-patch parameter-gradient implementation.")
_PATCH_CHUNK = flags.DEFINE_integer("patch_chunk", 28, "Patches per compiled per-patch-gradient call.")
_APPEND = flags.DEFINE_bool("append", True, "Add the hypothesis table to <workdir>/report.md.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  out = report.analyze_run(_WORKDIR.value, _CATEGORY.value or None, num_images=_NUM_IMAGES.value,
                           sweeps=_SWEEPS.value or None, num_param_images=_NUM_PARAM_IMAGES.value,
                           method=_METHOD.value, patch_chunk=_PATCH_CHUNK.value)
  if _APPEND.value:
    report.append_to_report(_WORKDIR.value, out)
  print("\n".join(report.summary_table(out)))
  print(f"\nwrote {Path(_WORKDIR.value) / 'analysis' / 'report.md'} ({out['seconds']['total']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
