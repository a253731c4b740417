"""Study A's conclusions on synthetic per-budget records with planted answers, and the
report pipeline: conclusions → sections → one writer."""

import json

import numpy as np
import pytest

from tailjax import io, metaanalysis, reporting
from tailjax.configs import fastflow_mvtec
from tailjax.evaluation import METRIC_KEYS
from tailjax.studies import study_a_conclusions as sac
from tailjax.studies import study_a_report as rep


def _cfg():
  c = fastflow_mvtec.get_config("smoke")
  c.report.baseline, c.report.treatment = "mean_only", "tail_aware"
  c.eval.plateau_tol = 0.01
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
  return _finished(out)


def _finished(results):
  """Adds what a finished category's results hold beside the budgets: the last step's
  metrics per row, PaDiM and the grid."""
  for res in results.values():
    last = res["budgets"][str(max(int(s) for s in res["budgets"]))]
    res["rows"] = [{**r, "metrics": rec["metrics"]} for r, rec in zip(res["rows"], last)]
    res["padim"] = {k: 0.5 for k in METRIC_KEYS}
    res["grid"] = [8, 8]
  return results


def test_same_step_l2_finds_a_planted_gap_and_not_a_null():
  con = sac.conclusions(_cfg(), _results({0: 0.0, 10: -5.0, 20: 0.0}))
  same = con.links_same_step
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
  return _finished(out)


def _textures_cfg():
  c = _cfg()
  c.data.kind = "textures"
  return c


def test_by_regime_finds_a_slope_planted_on_detectability_and_groups_tiers():
  cats = HARD + CALIBRATED
  auroc = dict(zip(cats, (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)))
  effect = {c: 0.5 * (auroc[c] - 0.8) for c in cats}       # 0.5 pp per pp of AUROC
  results = _regime_results(effect, auroc, cats)
  con = sac.conclusions(_textures_cfg(), results)
  br = con.by_regime
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
  assert pooled["seed_paired"] == con.pooled_diff["pixel_ap"]
  d = sac.paired(sac.view(results, {c: [20] * 8 for c in cats}), "mean_only", "tail_aware",
                 lambda r: r["metrics"]["pixel_ap"])
  want = metaanalysis.random_effects(*metaanalysis.effects_from_seeds(list(d.values()),
                                                                     pool_variance=True))
  assert pooled["random_effects"]["mean"] == pytest.approx(want.mu)
  assert pooled["random_effects"]["tau2"] == pytest.approx(want.tau2)
  assert pooled["random_effects"]["tau2"] > 0 and pooled["random_effects"]["i2"] > 0.9
  mr = pooled["meta_regression"]
  assert mr["slope"]["lo"] > 0 and mr["slope"]["mean"] == pytest.approx(0.5, abs=0.1)
  assert mr["verdict"].startswith("the tail-aware effect grows with detectability")
  text = "\n".join(rep.regime_section(con))
  assert "| hard: seed-paired | hard | 3 |" in text and "| calibrated: random effects |" in text
  assert "grows with detectability" in text
  assert "**Across categories** (6 categories; tiers: hard 3, calibrated 3;" in "\n".join(
      rep.answer_lines(con))
  io.to_json(con.to_json())                                # conclusions.json stays writable


def _regime_cfg():
  c = _textures_cfg()
  c.flow.num_steps = sac.ORIGINAL["coupling_steps"]
  return c


def test_by_regime_null_slope_covers_zero_and_small_k_is_not_estimable():
  cats = HARD + CALIBRATED
  auroc = dict(zip(cats, (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)))
  results = _regime_results({c: 0.02 for c in cats}, auroc, cats, seed=1)   # constant effect
  br = sac.conclusions(_textures_cfg(), results).by_regime
  mr = br["pooled"]["pixel_ap"]["meta_regression"]
  assert mr["slope"]["lo"] < 0 < mr["slope"]["hi"]
  assert mr["verdict"].startswith("no dependence on detectability shown")
  re = br["pooled"]["pixel_ap"]["random_effects"]
  assert re["lo"] > 0 and re["mean"] == pytest.approx(0.02, abs=0.003)
  assert re["verdict"].startswith("tail-aware better")
  # Two categories: estimates per category and seed-paired, no random effects.
  two = sac.conclusions(_cfg(), _regime_results({"a": 0.02, "b": 0.0},
                                                {"a": 0.8, "b": 0.9}, ("a", "b")))
  br2 = two.by_regime
  assert list(br2["tiers"]) == ["—"] and br2["tiers"]["—"]["categories"] == ["a", "b"]
  for k in sac.REGIME_METRICS:
    assert br2["pooled"][k]["random_effects"] == {"estimable": False,
                                                  "reason": "not estimable (k < 3)"}
    assert not br2["pooled"][k]["meta_regression"]["estimable"]
  text = "\n".join(rep.regime_section(two))
  assert "not estimable (k < 3)" in text and "—: seed-paired" not in text   # one tier: no tier rows
  # One category: no by-regime key, no section, no answer bullet.
  one = sac.conclusions(_cfg(), _regime_results({"a": 0.02}, {"a": 0.8}, ("a",)))
  assert one.by_regime is None and rep.regime_section(one) == []
  assert "by_regime" not in one.to_json()


# ----------------------------------------------------------------------------
# Exact vs approximate per-patch NLL
# ----------------------------------------------------------------------------


def _nll_cfg():
  c = _regime_cfg()
  c.variants.tail_even_share = {"tail_weight": 0.7, "top_k_ratio": 0.02,
                                "tail_nll": "even_share"}
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
  return _finished(out)


def test_nll_comparison_finds_a_gain_planted_on_the_approximation_only():
  cats = HARD + CALIBRATED
  results = _variant_results({"mean_only": 0.0, "tail_aware": 0.0, "tail_even_share": 0.03}, cats)
  con = sac.conclusions(_nll_cfg(), results)
  nc = con.tail_nll
  assert nc["definitions"] == {"tail_aware": "exact", "tail_even_share": "even_share"}
  exact = nc["variants"]["tail_aware"]["vs_baseline"]["pixel_ap"]["all"]["random_effects"]
  approx = nc["variants"]["tail_even_share"]["vs_baseline"]["pixel_ap"]["all"]["random_effects"]
  assert exact["lo"] < 0 < exact["hi"]
  assert approx["lo"] > 0 and approx["mean"] == pytest.approx(0.03, abs=0.003)
  vs = nc["variants"]["tail_even_share"]["vs_exact"]["pixel_ap"]
  assert vs["all"]["random_effects"]["mean"] == pytest.approx(0.03, abs=0.003)
  assert set(vs) == {"hard", "calibrated", "all"}
  assert nc["variants"]["tail_even_share"]["vs_exact_reading"] == "better than exact"
  assert nc["verdict"] == "the original study's gain could come from the approximation"
  text = "\n".join(rep.nll_section(con))
  assert "## Exact vs approximate per-patch NLL in the tail" in text
  assert "| tail_even_share | even_share | hard |" in text
  assert "**the original study's gain could come from the approximation**" in text
  assert "Exact vs approximate per-patch NLL" in "\n".join(rep.answer_lines(con))
  # The treatment's own by-regime answer is untouched by the third variant.
  assert con.by_regime["pooled"]["pixel_ap"]["random_effects"]["mean"] == pytest.approx(
      exact["mean"])
  io.to_json(con.to_json())


def test_nll_comparison_null_and_absent():
  cats = HARD + CALIBRATED
  null = sac.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.0, "tail_even_share": 0.0}, cats, seed=2)).tail_nll
  assert null["verdict"] == "the approximation does not produce a gain here"
  assert null["variants"]["tail_even_share"]["vs_exact_reading"] == "no difference from exact shown"
  both = sac.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=3)).tail_nll
  assert both["verdict"] == "the approximation gains, and so does the exact loss"
  # No approximate variant (or no variants in the config): no comparison, no section.
  cfg = _nll_cfg()
  del cfg.variants["tail_even_share"]
  con = sac.conclusions(cfg, _variant_results({"mean_only": 0.0, "tail_aware": 0.0}, cats))
  assert con.tail_nll is None and rep.nll_section(con) == []
  assert sac.conclusions(_cfg(), _results({0: 0.0, 10: 0.0})).tail_nll is None


# ----------------------------------------------------------------------------
# The pipeline: conclusions → SECTIONS → one writer
# ----------------------------------------------------------------------------


def _analysis(cats, beyond=True):
  """The part of ``mechanisms.analyze_run``'s output the report reads."""
  l1 = lambda lam, p: {"share": 0.5, "null": 0.3, "excess": {"mean": 0.2, "lo": 0.1, "hi": 0.3,
                                                               "p": p}, "beyond": beyond}
  return {"overall": {h: "PARTIAL" for h in sac.HYPOTHESES},
          "categories": {c: {"l1": {"treatment": l1(0.7, 0.01), "baseline": l1(0.0, 0.5)},
                             **{h.lower(): {"verdict": "PARTIAL", "evidence": f"{c} {h}"}
                                for h in sac.HYPOTHESES}} for c in cats}}


def test_one_writer_writes_the_sections_report_and_conclusions_in_one_pass(tmp_path):
  cfg = _cfg()
  con = sac.conclusions(cfg, _results({0: 0.0, 10: -5.0, 20: 0.0}), _analysis(("a", "b")),
                        examples=("a",))
  lines = rep.write_report(tmp_path, con)
  assert lines == [line for section in rep.SECTIONS for line in section(con)]
  assert (tmp_path / "report.md").read_text() == "\n".join(lines).rstrip("\n") + "\n"
  assert (tmp_path / "budget_curve.png").read_bytes()[:4] == b"\x89PNG"
  saved = json.loads((tmp_path / "conclusions.json").read_text())
  assert saved == json.loads(io.to_json(con.to_json()))
  assert saved["setup"]["variants"][1] == {"name": "tail_aware", "tail_weight": 0.7,
                                           "top_k_ratio": 0.02, "tail_nll": "exact"}
  text = "\n".join(lines)
  # Every section once, in SECTIONS order; the analyses are a section like the others.
  heads = ["## Answer", "## The answer by regime", "## Setup", "## Results at the last step",
           "## Budget curve", "## Model selection without the test set",
           "## Convergence and what training does to detection", "## The causal chain",
           "## Anomaly-map examples", "## Mechanism analyses"]
  assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
  assert all(sum(line.startswith(h) for line in lines) == 1 for h in heads)
  assert "![a](a/examples.png)" in text and "![b](b/examples.png)" not in text
  assert "<!--" not in text                     # nothing to splice into
  # The analyses' L1 enters the causal chain and the Holm family.
  assert con.links["L1"]["verdict"] == "BEYOND CONSTRUCTION"
  assert set(con.link_holm) == {"L2", "L3", "L4", "L1 a", "L1 b"}
  assert "| **H3** | " + sac.ORIGINAL["claims"]["H3"] + " | **PARTIAL** | a: PARTIAL — a H3" in text
  # Without the analyses: no section, L1 not tested.
  bare = sac.conclusions(cfg, _results({0: 0.0, 10: -5.0, 20: 0.0}))
  assert bare.mechanisms is None and rep.mechanisms_section(bare) == []
  assert "needs the analysis" in "\n".join(rep.causal_section(bare))


def test_the_original_study_comes_from_the_data_file():
  h = sac.ORIGINAL["headline"]
  assert h["pixel_ap_percent"][1] - h["pixel_ap_percent"][0] == pytest.approx(
      h["pixel_ap_gain_pp"])
  con = sac.conclusions(_cfg(), _results({0: 0.0, 10: 0.0}))
  text = "\n".join(rep.answer_lines(con))
  assert ("The original study reported +9.94 pp pixel AP (45.86 → 55.80 %) and image AUROC "
          "96.62 → 98.05 % on its own data, from single runs.") in text
  # The smoke config's 4 coupling steps differ from the original study's 8: said once.
  assert f"default is {sac.ORIGINAL['coupling_steps']}" in text
  assert set(sac.ORIGINAL["claims"]) == set(sac.HYPOTHESES) == set(sac.ORIGINAL["hypotheses"])


# ----------------------------------------------------------------------------
# Readings at convergence: the plateau rule, the convergence count, step 0 and ρ
# ----------------------------------------------------------------------------

STEPS = (0, 10, 20, 30)
FLAT, FALLING = (10.0, 5.0, 4.6, 4.5), (10.0, 8.0, 6.0, 4.0)   # val NLL (nats per patch)


def _curve_results(val_of, ap_of, cats=("a", "b"), seeds=4):
  """Rows with planted curves over ``STEPS``: ``val_of(c, variant, seed)`` the validation
  NLL and ``ap_of(c, variant, seed)`` the test pixel AP at each step."""
  rng = np.random.default_rng(0)
  out = {}
  for c in cats:
    rows = [{"variant": v, "seed": s} for v in ("mean_only", "tail_aware") for s in range(seeds)]
    budgets = {}
    for j, step in enumerate(STEPS):
      recs = []
      for r in rows:
        rec = _record(rng, step, r["variant"], 0.0)
        rec["val"]["mean"] = val_of(c, r["variant"], r["seed"])[j]
        rec["metrics"]["pixel_ap"] = ap_of(c, r["variant"], r["seed"])[j]
        recs.append(rec)
      budgets[str(step)] = recs
    out[c] = {"rows": rows, "budgets": budgets}
  return _finished(out)


def _relative_plateau(v, tol):
  """The plateau rule relative to |v| (reference: it depends on a constant added to v)."""
  v = np.asarray(v)
  return STEPS[int(np.where(v - np.minimum.accumulate(v[::-1])[::-1] <= tol * np.abs(v))[0][0])]


def test_the_plateau_rule_is_absolute_and_free_of_a_constant():
  ap = lambda c, v, s: (0.5,) * len(STEPS)
  for const in (0.0, 100.0, 1000.0):
    res = _curve_results(lambda c, v, s: tuple(x + const for x in FLAT), ap, cats=("a",))
    assert sac.selected_steps(res, "a", "plateau", 1.0) == [10] * 8      # 5.0 − 4.5 ≤ 1 nat
    assert sac.selected_steps(res, "a", "plateau", 0.05) == [30] * 8
    assert sac.selected_steps(res, "a", "val", 1.0) == [30] * 8
  # The relative rule at 1 % moves with the constant: no plateau at 0, one at 10 steps at +100.
  assert _relative_plateau(FLAT, 0.01) == 30
  assert _relative_plateau(np.add(FLAT, 100.0), 0.01) == 10


def _plateaued(reached):
  """Validation curves: ``FLAT`` (plateau at 10 steps) for the (category, variant, seed)
  in ``reached``, ``FALLING`` (none before the last budget) otherwise."""
  return lambda c, v, s: FLAT if (c, v, s) in reached else FALLING


def test_convergence_count_and_the_answer_from_rows_that_reached_the_plateau():
  reached = {("a", "mean_only", s) for s in (0, 1, 2)} | {("a", "tail_aware", s) for s in (0, 1)}
  reached |= {("b", "mean_only", 0)}
  # At the selected (last) step tail − mean is +5 / +6 pp where both arms plateaued
  # (category a, seeds 0 and 1) and −20 pp everywhere else.
  def ap(c, v, s):
    both = c == "a" and s in (0, 1)
    return (0.4,) * 3 + ((0.4 + (0.05 + 0.01 * s if both else -0.2)) if v == "tail_aware"
                         else 0.4,)
  cfg = _cfg()
  cfg.eval.plateau_tol = 1.0
  con = sac.conclusions(cfg, _curve_results(_plateaued(reached), ap))
  pr = con.plateau_rows
  assert (pr["before_last"], pr["rows"]) == (6, 16)
  assert pr["categories"] == {"a": {"before_last": 5, "rows": 8},
                              "b": {"before_last": 1, "rows": 8}}
  assert pr["both_arms"] == {"a": [0, 1], "b": []}
  sens = pr["sensitivity"]
  assert sens["estimable"] and sens["pairs"] == 2
  assert sens["pixel_ap"]["mean"] == pytest.approx(0.055) and sens["pixel_ap"]["n"] == 2
  assert con.pooled_diff["pixel_ap"]["mean"] < 0                    # all rows: negative
  answer = "\n".join(rep.answer_lines(con))
  assert ("**Convergence:** 6 of 16 rows reached the plateau (validation NLL within 1 nat per "
          "patch") in answer
  assert f"{rep._pp(sens['pixel_ap'])} pp over 2 (category, seed) pairs" in answer
  assert "(a 5/8, b 1/8)" in "\n".join(rep.selection_section(con))
  # No pair where both arms plateaued: not estimable.
  none = sac.conclusions(cfg, _curve_results(_plateaued(reached - {("a", "tail_aware", 0),
                                                                   ("a", "tail_aware", 1)}), ap))
  assert none.plateau_rows["sensitivity"]["estimable"] is False
  assert "not estimable" in "\n".join(rep.answer_lines(none))


def test_training_that_lowers_val_nll_and_pixel_ap_reads_as_positive_rho_and_degradation():
  # Validation NLL falls at every step; mean-only pixel AP falls with it in every seed,
  # tail-aware's falls less and in seed 3 of category b ends above step 0.
  def ap(c, v, s):
    if v == "mean_only":
      return (0.5, 0.45, 0.4, 0.3)
    return (0.5, 0.55, 0.5, 0.55) if (c, s) == ("b", 3) else (0.5, 0.48, 0.47, 0.45)
  con = sac.conclusions(_cfg(), _curve_results(lambda c, v, s: FALLING, ap))
  cv = con.convergence
  mo, ta = cv["a"]["mean_only"], cv["a"]["tail_aware"]
  assert mo["spearman"] == pytest.approx([1.0] * 4) and mo["spearman_mean"] == pytest.approx(1.0)
  assert mo["step0"] == [0.5] * 4 and mo["selected_steps"] == [30] * 4
  assert mo["ceiling"] == [0.5] * 4 and mo["ceiling_steps"] == [0] * 4
  assert mo["degrades"] and ta["degrades"]
  assert mo["change"] == pytest.approx(-0.2) and ta["change"] == pytest.approx(-0.05)
  assert cv["b"]["mean_only"]["degrades"] and not cv["b"]["tail_aware"]["degrades"]
  assert cv["b"]["tail_aware"]["ceiling"][3] == 0.55
  answer = "\n".join(rep.answer_lines(con))
  assert ("training degrades detection in a (mean_only -20.0 pp, tail_aware -5.0 pp); "
          "b (mean_only -20.0 pp)") in answer
  assert "Both arms lose pixel AP in a; tail_aware loses less in a." in answer
  assert "ρ > 0, lower validation NLL with worse detection, in 4 of 4" in answer
  text = "\n".join(rep.convergence_section(con))
  assert "## Convergence and what training does to detection" in text
  assert "| a | mean_only | 50.00 ± 0.00 | 30, 30, 30, 30 | 30.00 ± 0.00 | -20.00 |" in text
  assert "| +1.00 | **yes** |" in text and "reads the test set" in text
  # Pixel AP rising while the validation NLL falls: ρ < 0, no degradation.
  up = sac.conclusions(_cfg(), _curve_results(lambda c, v, s: FALLING,
                                              lambda c, v, s: (0.3, 0.4, 0.45, 0.5)))
  cell = up.convergence["a"]["tail_aware"]
  assert cell["spearman_mean"] == pytest.approx(-1.0) and not cell["degrades"]
  assert "training degrades detection in no category and arm" in "\n".join(rep.answer_lines(up))
  io.to_json(con.to_json())


def _overlap_analysis(cats, mean_overlap):
  """``_analysis`` with every category's "nll_overlap" (``mechanisms.nll_overlap``) at one
  mean validation overlap."""
  an = _analysis(cats)
  s = {"n_images": 24, "mean": {"mean": mean_overlap, "lo": mean_overlap - 0.02,
                                "hi": mean_overlap + 0.02, "std": 0.05, "n": 24},
       "median": mean_overlap, "p10": mean_overlap - 0.1, "min": mean_overlap - 0.2}
  for c in cats:
    an["categories"][c]["nll_overlap"] = {"tail_aware": {"val": s}, "tail_even_share": {"val": s}}
  return an


def test_nll_comparison_tost_on_planted_equivalent_and_different_pairs():
  cats = HARD + CALIBRATED
  cfg = _nll_cfg()
  cfg.report.equivalence_margin_pp = 2.0
  verdict = lambda nc: nc["variants"]["tail_even_share"]["equivalence"]
  # Equivalent: the same pixel AP up to seed noise (0.4 pp), well inside ±2 pp.
  same = sac.conclusions(cfg, _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=4),
      _overlap_analysis(cats, 0.97)).tail_nll
  eq = verdict(same)
  assert eq["pooled"]["verdict"] == "equivalent within ±2 pp" and eq["pooled"]["tost_p"] < 0.05
  assert -2 < eq["pooled"]["ci90_lo"] < eq["pooled"]["ci90_hi"] < 2
  assert set(eq["categories"]) == set(cats)
  # Different: a planted 4 pp difference.
  diff = sac.conclusions(cfg, _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.07}, cats, seed=5)).tail_nll
  d = verdict(diff)["pooled"]
  assert d["verdict"] == "different" and d["lo"] > 0 and d["mean"] == pytest.approx(4.0, abs=0.3)
  assert all(v["verdict"] == "different" for v in verdict(diff)["categories"].values())
  # Neither: the same planted 1 pp difference with seed noise too wide for either reading.
  wide = sac.conclusions(cfg, _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.04}, cats, seeds=3,
      noise=0.04, seed=6)).tail_nll
  assert verdict(wide)["pooled"]["verdict"] == "neither shown equivalent nor different"
  # A tighter margin the same data do not meet: the verdict follows the margin in the config.
  cfg.report.equivalence_margin_pp = 0.1
  tight = sac.conclusions(cfg, _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=4)).tail_nll
  assert verdict(tight)["pooled"]["verdict"] != "equivalent within ±0.1 pp"
  # The section says both definitions split the joint NLL, the equivalence reading and
  # the manipulation check; it never claims "the same" gain.
  con = sac.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=4),
      _overlap_analysis(cats, 0.97))
  text = "\n".join(rep.nll_section(con))
  assert "split the same joint NLL" in text and "**equivalent within ±2 pp**" in text
  assert "cannot distinguish them" in text and "gains the same" not in text
  low = sac.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=4),
      _overlap_analysis(cats, 0.5)).tail_nll
  assert low["overlap"]["reading"].startswith("the two definitions pick different patches")
  assert "not measured" in "\n".join(rep.nll_section(sac.conclusions(_nll_cfg(), _variant_results(
      {"mean_only": 0.0, "tail_aware": 0.03, "tail_even_share": 0.03}, cats, seed=4))))
  with pytest.raises(ValueError, match="equivalence_margin_pp"):
    cfg.report.equivalence_margin_pp = 0.0
    sac.conclusions(cfg, _variant_results(
        {"mean_only": 0.0, "tail_aware": 0.0, "tail_even_share": 0.0}, cats))
