"""Study A's conclusions on synthetic per-budget records with planted answers."""

import ml_collections
import numpy as np
import pytest

from tailjax import reporting
from tailjax.evaluation import METRIC_KEYS
from tailjax.studies import study_a_report as rep


def _cfg():
  c = ml_collections.ConfigDict()
  c.report = {"baseline": "mean_only", "treatment": "tail_aware"}
  c.eval = {"plateau_tol": 0.01}
  return c


def _record(rng, step, variant, gap_shift):
  """One row's record at one step; tail-aware's normal tail gap shifted by ``gap_shift``."""
  tail = variant == "tail_aware"
  gap = 30.0 + (gap_shift if tail else 0.0) + rng.normal(0, 0.3)
  return {"metrics": {k: 0.5 + rng.normal(0, 0.01) for k in METRIC_KEYS},
          "val": {"mean": 100.0 / (1 + step) + (0.5 if tail else 0.0), "gap": gap,
                  "p99.5": 50.0 + gap},
          "boundary": {"all": {"fpr_at_tpr": 0.1}, "band": {"ap": 0.3 + rng.normal(0, 0.01)},
                       "interior": {"ap": 0.4 + rng.normal(0, 0.01)}}}


def _results(gap_shift_by_step, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for cat in ("a", "b"):
    rows = [{"variant": v, "seed": s} for v in ("mean_only", "tail_aware") for s in range(4)]
    budgets = {str(step): [_record(rng, step, r["variant"], shift) for r in rows]
               for step, shift in gap_shift_by_step.items()}
    out[cat] = {"rows": rows, "budgets": budgets}
  return out


def test_same_step_l2_finds_a_planted_gap_and_not_a_null():
  con = rep.conclusions(_cfg(), _results({0: 0.0, 10: -5.0, 20: 0.0}))
  same = con["links_same_step"]
  assert sorted(same) == [10, 20]                         # trained budgets only
  planted, null = same[10]["gap"], same[20]["gap"]
  assert planted["mean"] == pytest.approx(-5.0, abs=0.5) and planted["hi"] < 0
  assert null["lo"] < 0 < null["hi"]
  text = "\n".join(rep.same_step_table(con))
  assert f"| 10 | {reporting.interval(planted, signed=True)} |" in text
  assert "Both models at the same step" in text
