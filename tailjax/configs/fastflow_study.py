r"""Study A as the study ran it: 8 coupling steps, a budget ladder to a validation plateau,
3 seeds, every texture category, then the mechanism analyses.

Command (`make study`):
  tailjax train --config=configs/fastflow_study.py --workdir=runs/study

Same pipeline and report as `configs/fastflow_textures.py` (the demo), which stays
smaller for time (4 coupling steps, 300 steps). Here every (variant, seed) row trains
2000 steps of batch 16 with the FastFlow architecture the study used (8 coupling
steps, 3×3/1×1 alternating, hidden ratio 1.0, clamp 2.0) and is evaluated at steps
0, 10, 30, 100, 300, 1000 and 2000 (at 1000 steps, 4 of 18 tail-aware rows had not
reached the validation plateau); the report's model-selection table says which step
each row's validation NLL selects and whether the plateau rule found a plateau
before the last budget. If not, extend the finished run instead of retraining it:
`tailjax train --config=configs/fastflow_study.py --workdir=runs/study --extend
--config.train.num_steps=4000 --config.eval.budgets="(0,10,30,100,300,1000,2000,4000)"`
(``runrecord``: the first 2000 steps and their evaluations are reused and the
manifest records the extension). `configs/fastflow_study.py:smoke` is the demo's
smoke run with 8 coupling steps.
"""

import ml_collections

from tailjax.configs import fastflow_textures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/fastflow_study.py: unknown variant {arg!r} (known: 'smoke')")
  smoke = arg == "smoke"
  c = fastflow_textures.get_config("smoke" if smoke else None)
  c.flow.num_steps = 8
  if not smoke:
    c.train.num_steps = 2000
    c.train.segment_steps = 250
    c.eval.budgets = (0, 10, 30, 100, 300, 1000, 2000)
  return c
