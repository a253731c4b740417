r"""Ablation (H4): top-k ratio r ∈ {0.01, 0.02, 0.03, 0.05, 0.10, 0.20, 0.50, 1.0} at λ = 0.7, 3 seeds.

Command:
  python scripts/sweep.py --config=configs/sweep_top_k.py --workdir=runs/sweep_top_k

Same pipeline and files as `configs/sweep_tail_weight.py`: 8 r × 3 seeds = 24
flows per category trained as one program, then it prints
`[brick] 24 rows trained and evaluated in … s` per category and the
`results.md` table, one line per r with its k = max(1, round(r · 196)) (k = 2,
4, 6, 10, 20, 39, 98, 196 on the 14×14 grid) and the metrics (mean ± std over
seeds, %). r = 1.0 with any λ is the mean-only loss (the top-k set is every
patch), a built-in control. `configs/sweep_top_k.py:smoke`: r ∈ {0.02, 1.0},
2 seeds, 10 steps.
"""

import ml_collections

from tailjax.configs import sweep_tail_weight


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = sweep_tail_weight.get_config("smoke" if smoke else None)
  c.sweep.tail_weight = (0.7,)
  c.sweep.top_k_ratio = (0.02, 1.0) if smoke else (0.01, 0.02, 0.03, 0.05, 0.10, 0.20, 0.50, 1.0)
  return c
