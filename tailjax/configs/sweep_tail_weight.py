r"""Ablation: tail weight λ ∈ {0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0} at r = 0.02, 3 seeds.

Command:
  python scripts/sweep.py --config=configs/sweep_tail_weight.py --workdir=runs/sweep_lambda

For every category of the demo (brick, grass | moon, tissue: two of each tier) it
trains all 7 λ × 3 seeds = 21 flows as ONE program (`tailjax.sweep`: rows
sharded over all devices, checkpointed every `train.segment_steps` steps, a
killed run resumes), evaluates every row, and prints
`[brick] 21 rows trained and evaluated in … s` per category, then the table
written to `<workdir>/results.md`: one line per λ with image AUROC, pixel
AUROC, pixel AP and AUPRO@0.3 (mean ± std over seeds, %), the best pixel AP in
bold, per category and averaged over categories. Per-row numbers go to
`results.json` (`{"rows": [{category, tail_weight, top_k_ratio,
learning_rate, seed, metrics}]}`) and `results.jsonl`.

The grid is the lists in `config.sweep`; any of them can be overridden, e.g.
`--config.sweep.seeds="(0,1,2,3,4)"`, `--config.sweep.learning_rate="(3e-4,1e-3)"`,
`--config.sweep.tail_nll=exact,even_share` (the tail ranked by the exact per-patch NLL and
by a FastFlow user's even-share approximation, as one more grid axis).
Real data: `--config.data.kind=mvtec --config.data.root=/path/to/mvtec
--config.data.categories=bottle,carpet` (same data fields as
`configs/fastflow_textures.py`). `configs/sweep_tail_weight.py:smoke` shrinks
the run (λ ∈ {0, 0.7}, 2 seeds, 10 steps, small benchmark) to a minute.
"""

import ml_collections

from tailjax.configs import fastflow_textures


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  c = fastflow_textures.get_config("smoke" if smoke else None)
  # Study A's two-variant comparison fields do not apply to a grid.
  for name in ("variants", "report", "padim", "num_seeds", "mechanisms", "seed"):
    del c[name]
  # The difficulty ladder and the test-image bootstrap serve study A's report, not a grid.
  del c.data["ladder"]
  del c.eval["n_boot"]

  c.sweep = ml_collections.ConfigDict()
  c.sweep.tail_weight = (0.0, 0.7) if smoke else (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
  c.sweep.top_k_ratio = (0.02,)
  c.sweep.learning_rate = (c.optim.learning_rate,)   # the demo's learning rate
  # Per-patch NLL the tail is ranked by (exact | sq_norm | even_share; losses.NLL_DEFINITIONS).
  c.sweep.tail_nll = ("exact",)
  c.sweep.seeds = (0, 1) if smoke else (0, 1, 2)
  return c
