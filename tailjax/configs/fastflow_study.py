r"""Study A on both tiers and their difficulty ladders: every texture category, 2000 steps,
3 seeds, then the mechanism analyses.

Command (`make study`):
  tailjax train --config=configs/fastflow_study.py --workdir=runs/study

Same pipeline, flow and report as `configs/fastflow_textures.py` (the demo), on all nine
categories (hard: brick, grass, gravel; calibrated: moon, tissue, page, notes, retina,
coins) and 2000 steps: mean-only and tail-aware (exact per-patch NLL in the tail), 3
seeds each: 54 rows of 2000 steps of batch 16, FastFlow with 4 coupling steps (3×3/1×1
alternating, hidden ratio 1.0, clamp 2.0), evaluated at steps 0, 30, 100, 300, 600,
1000, 1250, 1500, 1750 and 2000 on the benchmark's test sets, and at step 2000 on every
rung of every category's difficulty ladder (the within-category dose–response; only
brick, moon, tissue, retina and coins keep two or more rungs under the clipping limit,
so five categories carry a slope).

Why 2000 steps: the demo's measured plateau curve (validation NLL per patch, 1 seed)
reaches the 1-nat plateau rule at 400–1500 steps depending on category and arm; 2000
steps with budgets every 250 steps from 1000 on gives every row room to show a plateau
before the last budget (all 54 did), and 54 rows × 2000 steps is what fits `make study`
in about 95 min on a 2-core CPU. If rows still have not plateaued, extend the finished run
instead of retraining it:
`tailjax train --config=configs/fastflow_study.py --workdir=runs/study --extend
--config.train.num_steps=3000 --config.eval.budgets="(0,30,100,300,600,1000,1250,1500,1750,2000,2500,3000)"`
(``runrecord``: the first 2000 steps and their evaluations are reused and the manifest
records the extension).

Why 4 coupling steps and not FastFlow's 8: a row-step costs about 40 ms at 4 steps and
twice that at 8 (benchmarks/results.md), so the study would take over 3 h at 8. The
categories (the power of the random-effects estimates) and training to the plateau take
priority over the depth. `:arch8` is the same study with 8 coupling steps (on a GPU,
run it with `--config.num_seeds=5`).

Variants: `:arch8` as above; `:even_share` adds the tail-aware loss with the even-share
per-patch NLL in the tail (``tail_even_share``, 81 rows): the exact-vs-even-share
equivalence test (TOST, ``report.equivalence_margin_pp``) and the top-k overlap of the
two rankings on the trained models; `:hard` is the study on the hard tier alone
(brick, grass, gravel; 8 coupling steps, 2000 steps); `:smoke` is the demo's smoke run
with 8 coupling steps.
"""

import ml_collections

from tailjax.configs import fastflow_textures

VARIANTS = ("smoke", "hard", "arch8", "even_share")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", *VARIANTS):
    raise ValueError(f"configs/fastflow_study.py: unknown variant {arg!r} "
                     f"(known: {', '.join(map(repr, VARIANTS))})")
  smoke, hard, arch8 = arg == "smoke", arg == "hard", arg == "arch8"
  c = fastflow_textures.get_config("smoke" if smoke else ("hard" if hard else
                                                           "even_share" if arg == "even_share"
                                                           else None))
  c.flow.num_steps = 8 if (smoke or hard or arch8) else 4
  if hard:
    c.train.num_steps = 2000
    c.train.segment_steps = 250
    c.eval.budgets = (0, 10, 30, 100, 300, 1000, 2000)
  elif not smoke:
    c.data.categories = "hard,calibrated"
    c.train.num_steps = 2000
    c.train.segment_steps = 250
    c.eval.budgets = (0, 30, 100, 300, 600, 1000, 1250, 1500, 1750, 2000)
  return c
