"""Study B's verdicts: each answer of the diagnosis from an explicit rule over the
per-ratio results (``mil_diagnosis.diagnose_ratio``), with and without the test-set error.

The rules were fixed before the run and are stated in the module docstring of
``tailjax/studies/mil_diagnosis.py`` (the report cites them there). Pure functions of
the JSON-ready results: nothing here trains or writes.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tailjax import reporting
from tailjax import stats
from tailjax.data import bags as bags_lib

# The arms the rules compare. The experiment trains and scores them; the rules and the
# report name them, so they live here, below both.
ABLATIONS = ("loss_only", "lr_only", "epochs_only", "layer_norm_only")
GAIN_CANDIDATES = ABLATIONS + ("after",)
BASELINES = ("dispersion", "medoid_max", "medoid_topk")
NULL_RECIPE = "before"


def relation_choice(per_ratio: Mapping[str, dict], ratio: str) -> str | None:
  """The relation-aware attention-pooling recipe with the best mean *validation* AUC (never test)."""
  rel = {n: v for n, v in per_ratio[ratio]["recipes"].items()
         if v["model"] == "relation" and v["pooling"] == "attention"}
  if not rel:
    return None
  return max(rel, key=lambda n: (np.mean(rel[n]["val_auc"]), n))


def attention_choice(per_ratio: Mapping[str, dict], ratio: str) -> str:
  """The plain attention-MIL recipe (attention model and pooling) with the best mean validation AUC."""
  att = {n: v for n, v in per_ratio[ratio]["recipes"].items()
         if v["model"] == "attention" and v["pooling"] == "attention"}
  return max(att, key=lambda n: (np.mean(att[n]["val_auc"]), n))


def _side(ci, null: float = 0.0) -> int:
  return reporting.side_of_zero(ci, null)


def side_words(side: int, above: str, below: str, neither: str) -> str:
  return {1: above, -1: below, 0: neither}[side]


def max_pool_recipes(recs: Mapping[str, dict]) -> list[str]:
  return [n for n, v in recs.items() if v["pooling"] == "max"]


def instance_models(per_ratio: Mapping[str, dict], ratio: str) -> list[str]:
  """The models whose instances the answers and the figure examine at ``ratio``:
  the study's before/after, the relation model chosen on validation, max pooling."""
  recs = per_ratio[ratio]["recipes"]
  names = ["before", "after", relation_choice(per_ratio, ratio)] + max_pool_recipes(recs)
  return [n for n in dict.fromkeys(names) if n is not None and n in recs]


def answers(config, per_ratio: Mapping[str, dict]) -> dict:
  """The verdicts, each from an explicit rule (module docstring), with and without test-set error."""
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  flat_range = float(config.flat_range)
  rec = lambda r, n: per_ratio[r]["recipes"][n]
  out: dict[str, Any] = {}

  # 1. Do the features carry the signal?
  out["baseline_rule"] = {}
  for r in ratios:
    ci = per_ratio[r]["baselines"]["dispersion"]["test"]
    out["baseline_rule"][r] = {"point": "signal" if ci["mean"] >= thr else "weak",
                               "interval": side_words(_side(ci, thr), "signal", "weak", "undetermined")}

  # 2. Is "before" flat?
  before = {r: rec(r, "before")["test"] for r in ratios}
  spread = max(c["mean"] for c in before.values()) - min(c["mean"] for c in before.values())
  lo_r, hi_r = min(ratios, key=bags_lib.ratio_value), max(ratios, key=bags_lib.ratio_value)
  d = stats.linear_combination_interval([before[hi_r], before[lo_r]], [1.0, -1.0])
  flat_iv = ("not flat" if _side(d) != 0 else
             "flat" if d["lo"] > -flat_range and d["hi"] < flat_range else "undetermined")
  out["flat"] = {"spread": spread, "point": "flat" if spread < flat_range else "not flat",
                 "ends": [lo_r, hi_r], "end_difference": d, "interval": flat_iv}

  # 3. Did the loss weighting cause it?
  loss = {r: rec(r, "loss_only")["vs_before"] for r in ratios if "loss_only" in per_ratio[r]["recipes"]}
  seed_side = {r: _side(ci["seed_ci"]) for r, ci in loss.items()}
  full_side = {r: _side(ci) for r, ci in loss.items()}
  majority = lambda sides: len(sides) > 0 and sum(v > 0 for v in sides.values()) > len(sides) / 2
  out["loss"] = {"seed_side": seed_side, "side": full_side, "cause_seeds": majority(seed_side),
                 "cause": majority(full_side)}

  # 4. Is the plain attention-MIL below the no-learning baseline?
  out["attention_vs_baseline"] = {}
  for r in ratios:
    best = attention_choice(per_ratio, r)
    ci = rec(r, best)["vs_dispersion"]
    out["attention_vs_baseline"][r] = {
        "recipe": best, "test": rec(r, best)["test"], "baseline": per_ratio[r]["baselines"]["dispersion"]["test"],
        "diff": ci, "side_seeds": _side(ci["seed_ci"]), "side": _side(ci)}

  # 5. Which single change matters most? Mean over ratios (independent test sets).
  gains = {}
  for a in GAIN_CANDIDATES:
    if all(a in per_ratio[r]["recipes"] for r in ratios):
      gains[a] = stats.linear_combination_interval([rec(r, a)["vs_before"] for r in ratios],
                                                   [1.0 / len(ratios)] * len(ratios))
  out["gains"] = gains
  singles = sorted((a for a in gains if a != "after"), key=lambda a: -gains[a]["mean"])
  if len(singles) >= 2:
    best, second = singles[:2]
    diff = stats.linear_combination_interval([per_ratio[r]["gain_pairs"][f"{best}|{second}"] for r in ratios],
                                             [1.0 / len(ratios)] * len(ratios))
    out["largest_gain"] = {"best": best, "runner_up": second, "difference": diff, "clear": _side(diff) > 0}
  elif singles:
    out["largest_gain"] = {"best": singles[0], "runner_up": None, "difference": None, "clear": True}

  # 6. Does the relation-aware model beat the dispersion baseline at the smallest ratio?
  rel = relation_choice(per_ratio, lo_r)
  if rel is not None:
    ci = rec(lo_r, rel)["vs_dispersion"]
    out["relation"] = {"ratio": lo_r, "recipe": rel, "test": rec(lo_r, rel)["test"],
                       "baseline": per_ratio[lo_r]["baselines"]["dispersion"]["test"], "diff": ci,
                       "side_seeds": _side(ci["seed_ci"]), "side": _side(ci)}

  # 7. Does attention find the contaminants?
  out["instances"] = {}
  for r in ratios:
    row = {}
    for n in instance_models(per_ratio, r):
      ins = rec(r, n)["instance"]
      row[n] = {"auroc": ins["pool_auroc"], "uses": _side(ins["pool_auroc"], 0.5),
                "score_auroc": ins["score_auroc"], "top1": ins["top1"]}
    base = per_ratio[r]["instance_baseline"]
    out["instances"][r] = {"models": row, "baseline": base["pool_auroc"], "baseline_top1": base["top1"],
                           "chance_top1": per_ratio[r]["chance_top1"]}

  # 8. Learned pooling vs the instance-level no-learning score (medoid distance, max).
  out["vs_instance_baseline"] = {}
  for r in ratios:
    names = [n for n in [relation_choice(per_ratio, r)] + max_pool_recipes(per_ratio[r]["recipes"]) + ["after"]
             if n is not None and n in per_ratio[r]["recipes"]]
    out["vs_instance_baseline"][r] = {n: {"diff": rec(r, n)["vs_medoid_max"],
                                          "side": _side(rec(r, n)["vs_medoid_max"])}
                                      for n in dict.fromkeys(names)}

  # 9. Below-chance cells: noise?
  cells = []
  for r in ratios:
    for n, v in per_ratio[r]["recipes"].items():
      if v["test"]["mean"] < 0.5:
        cells.append({"ratio": r, "recipe": n, "test": v["test"], "seed_side": _side(v["test"]["seed_ci"], 0.5),
                      "side": _side(v["test"], 0.5)})
  out["below_chance"] = cells
  out["null"] = {r: {"test": per_ratio[r]["null"]["test"], "side": _side(per_ratio[r]["null"]["test"], 0.5)}
                 for r in ratios}
  out["shift"] = {r: per_ratio[r]["shift"] for r in ratios}
  return out
