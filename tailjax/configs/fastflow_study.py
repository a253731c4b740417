r"""Study A as the study ran it: 8 coupling steps, a budget ladder to 1000 steps, 3 seeds,
every texture category of both tiers, then the mechanism analyses.

Command (`make study`):
  tailjax train --config=configs/fastflow_study.py --workdir=runs/study

Same pipeline and report as `configs/fastflow_textures.py` (the demo), which stays
smaller for time (4 categories, 4 coupling steps, 300 steps). Here all nine categories
(hard: brick, grass, gravel; calibrated: moon, tissue, page, notes, retina, coins) train
mean-only, tail-aware (exact per-patch NLL in the tail) and tail-aware with the
even-share per-patch NLL (``tail_even_share``) with 3 seeds each: 81 rows of 1000 steps
of batch 16 with the FastFlow architecture the study used (8 coupling steps, 3×3/1×1
alternating, hidden ratio 1.0, clamp 2.0), evaluated at steps 0, 10, 30, 100, 300 and
1000 (the validation plateau was reached by 1000 steps in 18 of 18 rows of the earlier
2000-step study). The report's model-selection table says which step each row's
validation NLL selects and whether the plateau rule found a plateau before the last
budget. If not, extend the finished run instead of retraining it:
`tailjax train --config=configs/fastflow_study.py --workdir=runs/study --extend
--config.train.num_steps=2000 --config.eval.budgets="(0,10,30,100,300,1000,2000)"`
(``runrecord``: the first 1000 steps and their evaluations are reused and the manifest
records the extension). Time on a 2-core CPU, estimated from the measured step time
(87 ms per row-step at 8 coupling steps): about 2 h of training; it resumes when
interrupted. `:hard` is the previous study (hard tier, mean-only and tail-aware, 2000
steps); `:smoke` is the demo's smoke run with 8 coupling steps.
"""

import ml_collections

from tailjax.configs import fastflow_textures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "smoke", "hard"):
    raise ValueError(f"configs/fastflow_study.py: unknown variant {arg!r} "
                     "(known: 'smoke', 'hard')")
  smoke, hard = arg == "smoke", arg == "hard"
  c = fastflow_textures.get_config(arg or None)
  c.flow.num_steps = 8
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
