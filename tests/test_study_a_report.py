"""Study A's conclusions on synthetic per-budget records with planted answers."""

import ml_collections
import numpy as np
import pytest

from tailjax import io, metaanalysis, reporting
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


# ----------------------------------------------------------------------------
# The answer by regime
# ----------------------------------------------------------------------------

HARD, CALIBRATED = ("brick", "grass", "gravel"), ("moon", "tissue", "page")


def _regime_results(effect_of, auroc_of, cats, seeds=4, noise=0.004, seed=0):
  """Rows whose pixel AP (and image AUROC) differ by ``effect_of[c]`` (tail − mean) per
  category, around a mean-only image AUROC ``auroc_of[c]``; seed noise ``noise`` on each
  row. The validation NLL selects the last step for every row."""
  rng = np.random.default_rng(seed)
  out = {}
  for c in cats:
    rows = [{"variant": v, "seed": s} for v in ("mean_only", "tail_aware") for s in range(seeds)]
    budgets = {}
    for step in (0, 10, 20):
      recs = []
      for r in rows:
        rec = _record(rng, step, r["variant"], 0.0)
        shift = effect_of[c] if r["variant"] == "tail_aware" else 0.0
        rec["metrics"]["pixel_ap"] = 0.4 + shift + rng.normal(0, noise)
        rec["metrics"]["image_auroc"] = auroc_of[c] + 0.2 * shift + rng.normal(0, noise)
        recs.append(rec)
      budgets[str(step)] = recs
    out[c] = {"rows": rows, "budgets": budgets}
  return out


def _textures_cfg():
  c = _cfg()
  c.data = {"kind": "textures"}
  return c


def test_by_regime_finds_a_slope_planted_on_detectability_and_groups_tiers():
  cats = HARD + CALIBRATED
  auroc = dict(zip(cats, (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)))
  effect = {c: 0.5 * (auroc[c] - 0.8) for c in cats}       # 0.5 pp per pp of AUROC
  results = _regime_results(effect, auroc, cats)
  con = rep.conclusions(_textures_cfg(), results)
  br = con["by_regime"]
  assert {c: v["tier"] for c, v in br["categories"].items()} == {
      **{c: "hard" for c in HARD}, **{c: "calibrated" for c in CALIBRATED}}
  assert br["tiers"]["hard"]["categories"] == list(HARD)
  assert br["tiers"]["calibrated"]["categories"] == list(CALIBRATED)
  for c in cats:
    assert br["categories"][c]["covariate"] == pytest.approx(auroc[c], abs=0.01)
  # Tier scopes pool their own categories only: hard lies below 0, calibrated above.
  hard, cal = (br["tiers"][t]["pixel_ap"]["seed_paired"] for t in ("hard", "calibrated"))
  assert hard["mean"] == pytest.approx(np.mean([effect[c] for c in HARD]), abs=0.005)
  assert cal["mean"] == pytest.approx(np.mean([effect[c] for c in CALIBRATED]), abs=0.005)
  assert hard["hi"] < 0 < cal["lo"]
  # The seed-paired pooled row is the existing pooled estimate; random effects is the
  # meta-analysis of the per-category (mean, var / S).
  pooled = br["pooled"]["pixel_ap"]
  assert pooled["seed_paired"] == con["pooled_diff"]["pixel_ap"]
  d = rep.paired(rep.view(results, {c: [20] * 8 for c in cats}), "mean_only", "tail_aware",
                 lambda r: r["metrics"]["pixel_ap"])
  want = metaanalysis.random_effects(*metaanalysis.effects_from_seeds(list(d.values()),
                                                                     pool_variance=True))
  assert pooled["random_effects"]["mean"] == pytest.approx(want.mu)
  assert pooled["random_effects"]["tau2"] == pytest.approx(want.tau2)
  assert pooled["random_effects"]["tau2"] > 0 and pooled["random_effects"]["i2"] > 0.9
  mr = pooled["meta_regression"]
  assert mr["slope"]["lo"] > 0 and mr["slope"]["mean"] == pytest.approx(0.5, abs=0.1)
  assert mr["verdict"].startswith("the tail-aware effect grows with detectability")
  text = "\n".join(rep.regime_section(_textures_cfg(), con))
  assert "| hard: seed-paired | hard | 3 |" in text and "| calibrated: random effects |" in text
  assert "grows with detectability" in text
  assert "**By regime** (6 categories; tiers: hard 3, calibrated 3)" in "\n".join(
      rep.answer_lines(_regime_cfg(), results, con))
  io.to_json(con)                                          # conclusions.json stays writable


def _regime_cfg():
  c = _textures_cfg()
  c.flow = {"num_steps": rep.STUDY_COUPLING_STEPS}
  return c


def test_by_regime_null_slope_covers_zero_and_small_k_is_not_estimable():
  cats = HARD + CALIBRATED
  auroc = dict(zip(cats, (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)))
  results = _regime_results({c: 0.02 for c in cats}, auroc, cats, seed=1)   # constant effect
  br = rep.conclusions(_textures_cfg(), results)["by_regime"]
  mr = br["pooled"]["pixel_ap"]["meta_regression"]
  assert mr["slope"]["lo"] < 0 < mr["slope"]["hi"]
  assert mr["verdict"].startswith("no dependence on detectability shown")
  re = br["pooled"]["pixel_ap"]["random_effects"]
  assert re["lo"] > 0 and re["mean"] == pytest.approx(0.02, abs=0.003)
  assert re["verdict"].startswith("tail-aware better")
  # Two categories: estimates per category and seed-paired, no random effects.
  two = rep.conclusions(_cfg(), _regime_results({"a": 0.02, "b": 0.0},
                                                {"a": 0.8, "b": 0.9}, ("a", "b")))
  br2 = two["by_regime"]
  assert list(br2["tiers"]) == ["—"] and br2["tiers"]["—"]["categories"] == ["a", "b"]
  for k in rep.REGIME_METRICS:
    assert br2["pooled"][k]["random_effects"] == {"estimable": False,
                                                  "reason": "not estimable (k < 3)"}
    assert not br2["pooled"][k]["meta_regression"]["estimable"]
  text = "\n".join(rep.regime_section(_cfg(), two))
  assert "not estimable (k < 3)" in text and "—: seed-paired" not in text   # one tier: no tier rows
  # One category: no by-regime key, no section, no answer bullet.
  one = rep.conclusions(_cfg(), _regime_results({"a": 0.02}, {"a": 0.8}, ("a",)))
  assert "by_regime" not in one and rep.regime_section(_cfg(), one) == []


# ----------------------------------------------------------------------------
# Exact vs approximate per-patch NLL
# ----------------------------------------------------------------------------


def _nll_cfg():
  c = _regime_cfg()
  c.variants = {"mean_only": {"tail_weight": 0.0, "top_k_ratio": 0.02},
                "tail_aware": {"tail_weight": 0.7, "top_k_ratio": 0.02},
                "tail_even_share": {"tail_weight": 0.7, "top_k_ratio": 0.02,
                                    "tail_nll": "even_share"}}
  return c


def _variant_results(effects, cats, seeds=4, noise=0.004, seed=0):
  """Pixel AP 0.4 + effects[variant] (+ seed noise) in every category; last step selected."""
  rng = np.random.default_rng(seed)
  out = {}
  for c in cats:
    rows = [{"variant": v, "seed": s} for v in effects for s in range(seeds)]
    budgets = {}
    for step in (0, 10, 20):
      recs = []
      for r in rows:
        rec = _record(rng, step, r["variant"], 0.0)
        rec["metrics"]["pixel_ap"] = 0.4 + effects[r["variant"]] + rng.normal(0, noise)
        rec["metrics"]["image_auroc"] = 0.8 + effects[r["variant"]] + rng.normal(0, noise)
        recs.append(rec)
      budgets[str(step)] = recs
    out[c] = {"rows": rows, "budgets": budgets}
  return out


def test_nll_comparison_finds_a_gain_planted_on_the_approximation_only():
  cats = HARD + CALIBRATED
  results = _variant_results({"mean_only": 0.0, "tail_aware": 0.0, "tail_even_share": 0.03}, cats)
  con = rep.conclusions(_nll_cfg(), results)
  nc = con["tail_nll"]
  assert nc["definitions"] == {"tail_aware": "exact", "tail_even_share": "even_share"}
  exact = nc["variants"]["tail_aware"]["vs_baseline"]["pixel_ap"]["all"]["random_effects"]
  approx = nc["variants"]["tail_even_share"]["vs_baseline"]["pixel_ap"]["all"]["random_effects"]
  assert exact["lo"] < 0 < exact["hi"]
  assert approx["lo"] > 0 and approx["mean"] == pytest.approx(0.03, abs=0.003)
  vs = nc["variants"]["tail_even_share"]["vs_exact"]["pixel_ap"]
  assert vs["all"]["random_effects"]["mean"] == pytest.approx(0.03, abs=0.003)
  assert set(vs) == {"hard", "calibrated", "all"}
  assert nc["variants"]["tail_even_share"]["vs_exact_reading"] == "better than exact"
  assert nc["verdict"] == "the seed's gain could come from the approximation"
  text = "\n".join(rep.nll_section(_nll_cfg(), con))
  assert "## Exact vs approximate per-patch NLL in the tail" in text
  assert "| tail_even_share | even_share | hard |" in text
  assert "**the seed's gain could come from the approximation**" in text
  assert "Exact vs approximate per-patch NLL" in "\n".join(
      rep.answer_lines(_nll_cfg(), results, con))
  # The treatment's own by-regime answer is untouched by the third variant.
  assert con["by_regime"]["pooled"]["pixel_ap"]["random_effects"]["mean"] == pytest.approx(
      exact["mean"])
  io.to_json(con)


def test_nll_comparison_null_and_absent():
  cats = HARD + CALIBRATED
  null = rep.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.0, "tail_even_share": 0.0}, cats, seed=2))["tail_nll"]
  assert null["verdict"] == "the approximation does not produce a gain here"
  assert null["variants"]["tail_even_share"]["vs_exact_reading"] == "no difference from exact shown"
  both = rep.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=3))["tail_nll"]
  assert both["verdict"] == "the approximation gains, and so does the exact loss"
  # No approximate variant (or no variants in the config): no comparison, no section.
  cfg = _nll_cfg()
  del cfg.variants["tail_even_share"]
  con = rep.conclusions(cfg, _variant_results({"mean_only": 0.0, "tail_aware": 0.0}, cats))
  assert "tail_nll" not in con and rep.nll_section(cfg, con) == []
  assert "tail_nll" not in rep.conclusions(_cfg(), _results({0: 0.0, 10: 0.0}))
