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


def _rec(per_ratio: Mapping[str, dict], ratio: str, name: str) -> dict:
  return per_ratio[ratio]["recipes"][name]


def _features_carry_signal(per_ratio, thr: float) -> dict:
  """Per ratio: "signal" / "weak" by the dispersion baseline's mean test AUC against
  ``thr``, and by its interval ("undetermined" when the interval covers ``thr``)."""
  out = {}
  for r in per_ratio:
    ci = per_ratio[r]["baselines"]["dispersion"]["test"]
    out[r] = {"point": "signal" if ci["mean"] >= thr else "weak",
              "interval": side_words(_side(ci, thr), "signal", "weak", "undetermined")}
  return out


def _before_is_flat(per_ratio, flat_range: float, lo_r: str, hi_r: str) -> dict:
  before = {r: _rec(per_ratio, r, "before")["test"] for r in per_ratio}
  spread = max(c["mean"] for c in before.values()) - min(c["mean"] for c in before.values())
  d = stats.linear_combination_interval([before[hi_r], before[lo_r]], [1.0, -1.0])
  flat_iv = ("not flat" if _side(d) != 0 else
             "flat" if d["lo"] > -flat_range and d["hi"] < flat_range else "undetermined")
  return {"spread": spread, "point": "flat" if spread < flat_range else "not flat",
          "ends": [lo_r, hi_r], "end_difference": d, "interval": flat_iv}


def _loss_is_a_cause(per_ratio) -> dict:
  loss = {r: _rec(per_ratio, r, "loss_only")["vs_before"] for r in per_ratio
          if "loss_only" in per_ratio[r]["recipes"]}
  seed_side = {r: _side(ci["seed_ci"]) for r, ci in loss.items()}
  full_side = {r: _side(ci) for r, ci in loss.items()}
  majority = lambda sides: len(sides) > 0 and sum(v > 0 for v in sides.values()) > len(sides) / 2
  return {"seed_side": seed_side, "side": full_side, "cause_seeds": majority(seed_side),
          "cause": majority(full_side)}


def _versus_dispersion(per_ratio, ratio: str, recipe: str) -> dict:
  """``recipe`` at ``ratio`` against the dispersion baseline: both intervals and the
  side of zero of their paired difference, over seeds and with test-set error."""
  ci = _rec(per_ratio, ratio, recipe)["vs_dispersion"]
  return {"recipe": recipe, "test": _rec(per_ratio, ratio, recipe)["test"],
          "baseline": per_ratio[ratio]["baselines"]["dispersion"]["test"], "diff": ci,
          "side_seeds": _side(ci["seed_ci"]), "side": _side(ci)}


def _gains(per_ratio) -> tuple[dict, dict | None]:
  """Mean paired gain over "before" across ratios (independent test sets) of each
  ``GAIN_CANDIDATES`` arm, and the largest single change against the runner-up."""
  ratios = list(per_ratio)
  gains = {}
  for a in GAIN_CANDIDATES:
    if all(a in per_ratio[r]["recipes"] for r in ratios):
      gains[a] = stats.linear_combination_interval([_rec(per_ratio, r, a)["vs_before"] for r in ratios],
                                                   [1.0 / len(ratios)] * len(ratios))
  singles = sorted((a for a in gains if a != "after"), key=lambda a: -gains[a]["mean"])
  if len(singles) >= 2:
    best, second = singles[:2]
    diff = stats.linear_combination_interval([per_ratio[r]["gain_pairs"][f"{best}|{second}"] for r in ratios],
                                             [1.0 / len(ratios)] * len(ratios))
    return gains, {"best": best, "runner_up": second, "difference": diff, "clear": _side(diff) > 0}
  if singles:
    return gains, {"best": singles[0], "runner_up": None, "difference": None, "clear": True}
  return gains, None


def _instances(per_ratio) -> dict:
  """Per ratio, whether each examined model's pooling weights find the foreign instances."""
  out = {}
  for r in per_ratio:
    models = {}
    for n in instance_models(per_ratio, r):
      ins = _rec(per_ratio, r, n)["instance"]
      models[n] = {"auroc": ins["pool_auroc"], "uses": _side(ins["pool_auroc"], 0.5),
                   "score_auroc": ins["score_auroc"], "top1": ins["top1"]}
    base = per_ratio[r]["instance_baseline"]
    out[r] = {"models": models, "baseline": base["pool_auroc"], "baseline_top1": base["top1"],
              "chance_top1": per_ratio[r]["chance_top1"]}
  return out


def _versus_instance_baseline(per_ratio) -> dict:
  out = {}
  for r in per_ratio:
    names = [n for n in [relation_choice(per_ratio, r)] + max_pool_recipes(per_ratio[r]["recipes"]) + ["after"]
             if n is not None and n in per_ratio[r]["recipes"]]
    diff = lambda n: _rec(per_ratio, r, n)["vs_medoid_max"]
    out[r] = {n: {"diff": diff(n), "side": _side(diff(n))} for n in dict.fromkeys(names)}
  return out


def _below_chance(per_ratio) -> list[dict]:
  cells = []
  for r in per_ratio:
    for n, v in per_ratio[r]["recipes"].items():
      if v["test"]["mean"] < 0.5:
        cells.append({"ratio": r, "recipe": n, "test": v["test"], "seed_side": _side(v["test"]["seed_ci"], 0.5),
                      "side": _side(v["test"], 0.5)})
  return cells


def answers(config, per_ratio: Mapping[str, dict]) -> dict:
  """The verdicts, each from an explicit rule (module docstring), with and without test-set error.

  Keys, in the report's order: ``baseline_rule`` (do the features carry the signal?),
  ``flat`` (is "before" flat?), ``loss`` (did the loss weighting cause it?),
  ``attention_vs_baseline`` (is the plain attention-MIL below the no-learning
  baseline?), ``gains`` and ``largest_gain`` (which single change matters most?),
  ``relation`` (does the relation-aware model beat the baseline at the smallest
  ratio?), ``instances`` (does attention find the contaminants?),
  ``vs_instance_baseline`` (learned pooling vs the medoid-distance score), and
  ``below_chance``, ``null``, ``shift`` (are below-chance cells noise?).
  """
  ratios = list(per_ratio)
  lo_r, hi_r = min(ratios, key=bags_lib.ratio_value), max(ratios, key=bags_lib.ratio_value)
  out: dict[str, Any] = {
      "baseline_rule": _features_carry_signal(per_ratio, float(config.baseline_threshold)),
      "flat": _before_is_flat(per_ratio, float(config.flat_range), lo_r, hi_r),
      "loss": _loss_is_a_cause(per_ratio),
      "attention_vs_baseline": {r: _versus_dispersion(per_ratio, r, attention_choice(per_ratio, r))
                                for r in ratios}}
  out["gains"], largest = _gains(per_ratio)
  if largest is not None:
    out["largest_gain"] = largest
  rel = relation_choice(per_ratio, lo_r)
  if rel is not None:
    out["relation"] = {"ratio": lo_r, **_versus_dispersion(per_ratio, lo_r, rel)}
  out["instances"] = _instances(per_ratio)
  out["vs_instance_baseline"] = _versus_instance_baseline(per_ratio)
  out["below_chance"] = _below_chance(per_ratio)
  out["null"] = {r: {"test": per_ratio[r]["null"]["test"], "side": _side(per_ratio[r]["null"]["test"], 0.5)}
                 for r in ratios}
  out["shift"] = {r: per_ratio[r]["shift"] for r in ratios}
  return out
