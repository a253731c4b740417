r"""Study A on both tiers: every texture category, a budget ladder to 1000 steps, 3 seeds,
three losses, then the mechanism analyses.

Command (`make study`):
  tailjax train --config=configs/fastflow_study.py --workdir=runs/study

Same pipeline, flow and report as `configs/fastflow_textures.py` (the demo), on all nine
categories (hard: brick, grass, gravel; calibrated: moon, tissue, page, notes, retina,
coins) and 1000 steps instead of four categories and 300: mean-only, tail-aware (exact
per-patch NLL in the tail) and tail-aware with the even-share per-patch NLL
(``tail_even_share``), 3 seeds each: 81 rows of 1000 steps of batch 16, FastFlow with 4
coupling steps (3×3/1×1 alternating, hidden ratio 1.0, clamp 2.0), evaluated at steps 0,
10, 30, 100, 300 and 1000. The report's model-selection table says which step each
row's validation NLL selects and whether the plateau rule found a plateau before the
last budget. If not, extend the finished run instead of retraining it:
`tailjax train --config=configs/fastflow_study.py --workdir=runs/study --extend
--config.train.num_steps=2000 --config.eval.budgets="(0,10,30,100,300,1000,2000)"`
(``runrecord``: the first 1000 steps and their evaluations are reused and the manifest
records the extension).

Measured on a 2-core CPU from an empty cache: 80 min of running (README; 68 min of it
training). Why 4 coupling steps and not FastFlow's 8: a row-step costs 41–44 ms
at 4 steps and 87 ms at 8 (benchmarks/results.md), so 81 rows × 1000 steps would be
about 2 h of training at 8, and `make study` is meant to finish within 90 min.
The categories (the power of the random-effects estimate) and the third loss (the
exact-vs-approximate question) take priority over the depth. `:arch8` is the same
study with 8 coupling steps (about 2.3 h on a 2-core CPU; on a GPU, run it with
`--config.num_seeds=5`).

Variants: `:arch8` as above; `:hard` is the study on the hard tier alone (brick,
grass, gravel; mean-only and tail-aware, 8 coupling steps, 2000 steps); `:smoke` is
the demo's smoke run with 8 coupling steps.
"""

import ml_collections

from tailjax.configs import fastflow_textures

VARIANTS = ("smoke", "hard", "arch8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", *VARIANTS):
    raise ValueError(f"configs/fastflow_study.py: unknown variant {arg!r} "
                     f"(known: {', '.join(map(repr, VARIANTS))})")
  smoke, hard, arch8 = arg == "smoke", arg == "hard", arg == "arch8"
  c = fastflow_textures.get_config("smoke" if smoke else ("hard" if hard else None))
  c.flow.num_steps = 8 if (smoke or hard or arch8) else 4
  if hard:
    c.train.num_steps = 2000
    c.train.segment_steps = 250
    c.eval.budgets = (0, 10, 30, 100, 300, 1000, 2000)
  elif not smoke:
    c.data.categories = "hard,calibrated"
    c.train.num_steps = 1000
    c.train.segment_steps = 250
    c.eval.budgets = (0, 10, 30, 100, 300, 1000)
  return c
