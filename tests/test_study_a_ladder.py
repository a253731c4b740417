"""Study A's dose–response on the difficulty ladder (``study_a_ladder``) from synthetic
results shaped as study A writes them: a planted within-category slope, a planted tier
difference without one, nulls, a rung left out of the slope, no ladder, and the report lines."""

from __future__ import annotations

import copy

import ml_collections
import numpy as np
import pytest

from tailjax import dose_response as DR
from tailjax.studies import study_a_ladder as L

BASE, TREAT = "mean_only", "tail_aware"
STEPS = ("0", "50", "100")    # the last budget is 100 (not the string maximum "50")


def _cfg(margin=0.1):
  return ml_collections.ConfigDict({"report": {"slope_margin": margin}})


def _arm_records(rng, x_J, delta_JxS, n_boot, sd_test, base_JxS):
  """(mean-only, tail-aware) values [J, S] and resamples [J, S, R], in pp: the tail arm is
  the base plus Δ plus the observed test set's draw (shared by the seeds); a resample
  shifts both arms by the same image draw and Δ by its own (shared by the seeds)."""
  j, s = delta_JxS.shape
  tail = base_JxS + delta_JxS + sd_test * rng.normal(size=(j, 1))
  shared_JxR = 2.0 * rng.normal(size=(j, n_boot))
  d_JxR = sd_test * rng.normal(size=(j, n_boot))
  base_r = base_JxS[..., None] + shared_JxR[:, None, :]
  tail_r = tail[..., None] + shared_JxR[:, None, :] + d_JxR[:, None, :]
  return base_JxS, tail, base_r, tail_r


def _results(seed, slope, *, k=4, n_seeds=3, n_rungs=5, n_boot=60, tiers=False,
             sd_seed=1.0, sd_test=1.0):
  """``k`` categories × ``n_rungs`` rungs × ``n_seeds`` seeds as study A's results dict.
  Δ pixel AP (pp) = intercept_c + ``slope`` · (x − 78) + seed noise (a seed offset shared by
  the rungs and a seed × rung part) + the test set's draw, x = 100 · auroc_cal. ``tiers``:
  even categories on x ∈ [85, 97] with intercept +7 pp, odd ones on [60, 75] with 0 (a tier
  difference, flat within each category); else all on [60, 97], intercepts N(0, 1) pp.
  Δ image AUROC: no slope."""
  rng = np.random.default_rng(seed)
  results = {}
  for c in range(k):
    lo, hi, icpt = ((60, 75, 0.0) if c % 2 else (85, 97, 7.0)) if tiers else \
        (60, 97, rng.normal())
    x_J = np.linspace(lo, hi, n_rungs)
    seed_noise = lambda: (sd_seed * rng.normal(size=(1, n_seeds))
                          + 0.5 * sd_seed * rng.normal(size=(n_rungs, n_seeds)))
    arms = {
        "pixel_ap": _arm_records(rng, x_J, icpt + slope * (x_J[:, None] - 78) + seed_noise(),
                                 n_boot, sd_test,
                                 30 + 0.3 * x_J[:, None] + 2 * rng.normal(size=(1, n_seeds))),
        "image_auroc": _arm_records(rng, x_J, 1.0 + seed_noise(), n_boot, sd_test,
                                    50 + 0.4 * x_J[:, None] + rng.normal(size=(1, n_seeds)))}
    rows = [{"variant": v, "seed": s} for v in (BASE, TREAT) for s in range(n_seeds)]

    def record(v, s):
      a = 0 if v == BASE else 1
      rungs = [{"metrics": {m: float(arms[m][a][j, s] / 100) for m in arms},
                "boot": {m: (arms[m][2 + a][j, s] / 100).tolist() for m in arms},
                "by_kind": {}} for j in range(n_rungs)]
      return {"metrics": {m: float(arms[m][a][-1, s] / 100) for m in arms}, "rungs": rungs}

    budgets = {st: [{"metrics": {}} for _ in rows] for st in STEPS[:-1]}
    budgets[STEPS[-1]] = [record(r["variant"], r["seed"]) for r in rows]
    results[f"cat{c}"] = {
        "rows": rows, "budgets": budgets,
        "ladder": [{"index": j, "name": f"s{j + 1}", "strength": 1.0 + j,
                    "auroc_cal": float(x_J[j] / 100), "clipped": 0.01, "in_slope": True,
                    "why_out": None, "n_test": 40, "n_defective": 20} for j in range(n_rungs)],
        "padim_rungs": [{"pixel_ap": 0.4, "image_auroc": float(x_J[j] / 100)}
                        for j in range(n_rungs)]}
  return results


def _run(results, margin=0.1):
  return L.ladder_conclusions(_cfg(margin), results, BASE, TREAT)


def _slopes(lad):
  """Every slope of the answer: per category and pooled, both metrics and scales."""
  out = {}
  for k, scales in lad["dose"].items():
    for scale, d in scales.items():
      out[(k, scale)] = ({c: s["mean"] for c, s in d["categories"].items()},
                         None if d["pooled"] is None else d["pooled"]["mean"])
  return out


@pytest.fixture(scope="module")
def planted():
  return _results(0, slope=0.3)


def test_planted_within_category_slope_grows(planted):
  lad = _run(planted)
  ap = lad["dose"]["pixel_ap"]["absolute"]
  assert lad["verdict"] == ap["verdict"] == DR.GROWS
  p = ap["pooled"]
  assert p["k"] == 4 and 0 < p["lo"] <= 0.3 <= p["hi"]
  assert sorted(ap["categories"]) == ["cat0", "cat1", "cat2", "cat3"]
  for s in ap["categories"].values():
    assert abs(s["mean"] - 0.3) < 4 * s["se"] and s["rungs"] == [0, 1, 2, 3, 4]
    assert s["se_test"] > 0 and len(s["slopes_per_seed"]) == 3
  assert lad["step"] == 100 and lad["margin"] == 0.1 and lad["covariate"] == L.COVARIATE
  # The rung table pairs the arms by seed and reads them in pp.
  assert len(lad["rungs"]) == 20
  for row in lad["rungs"]:
    res = planted[row["category"]]
    recs = res["budgets"]["100"]
    per_arm = {v: np.array([recs[i]["rungs"][row["index"]]["metrics"]["pixel_ap"]
                            for i, r in enumerate(res["rows"]) if r["variant"] == v])
               for v in (BASE, TREAT)}
    d = row["pixel_ap"]["delta"]
    assert d["mean"] == pytest.approx(100 * (per_arm[TREAT] - per_arm[BASE]).mean(), rel=1e-9)
    assert row["pixel_ap"]["base"] == pytest.approx(100 * per_arm[BASE].mean(), rel=1e-12)
    assert d["lo"] < d["mean"] < d["hi"] and d["n_boot"] == 60 and d["n_seeds"] == 3
    assert row["padim"] == res["padim_rungs"][row["index"]]


def test_rows_are_paired_by_variant_and_seed_not_by_position(planted):
  """Listing a category's rows (and their records alike) in another order changes nothing."""
  shuffled = copy.deepcopy(planted)
  for res in shuffled.values():
    order = [4, 1, 3, 0, 5, 2]
    res["rows"] = [res["rows"][i] for i in order]
    res["budgets"] = {st: [recs[i] for i in order] for st, recs in res["budgets"].items()}
  a, b = _run(planted), _run(shuffled)
  assert _slopes(a) == _slopes(b)
  assert [r["pixel_ap"] for r in a["rungs"]] == [r["pixel_ap"] for r in b["rungs"]]


def test_tier_difference_without_a_within_category_slope_is_no_dose_response():
  results = _results(1, slope=0.0, tiers=True)
  # The confound is there: category means of Δ rise with their mean covariate ...
  lad = _run(results)
  means = {c: np.mean([r["pixel_ap"]["delta"]["mean"] for r in lad["rungs"]
                       if r["category"] == c]) for c in results}
  xs = {c: 100 * np.mean([f["auroc_cal"] for f in results[c]["ladder"]]) for c in results}
  assert np.polyfit([xs[c] for c in results], [means[c] for c in results], 1)[0] > 0.2
  # ... which the within-category slope does not take for a dose–response.
  p = lad["dose"]["pixel_ap"]["absolute"]["pooled"]
  assert p["lo"] <= 0.0 <= p["hi"]
  assert lad["verdict"] not in (DR.GROWS, DR.SHRINKS)


def test_nulls_rarely_read_as_a_dose_response():
  verdicts = [_run(_results(100 + i, slope=0.0, n_boot=30))["verdict"] for i in range(20)]
  assert sum(v in (DR.GROWS, DR.SHRINKS) for v in verdicts) <= 3, verdicts
  assert all(v in DR.VERDICTS for v in verdicts)


def test_a_rung_left_out_of_the_slope_changes_no_slope(planted):
  # Rung 3, not the middle one: the middle rung's OLS weight is 0 whether it is in or out.
  out = copy.deepcopy(planted)
  out["cat0"]["ladder"][3].update(in_slope=False, why_out="clipped 7.0 % > 5 %")
  a = _run(out)
  moved = copy.deepcopy(out)
  for i, row in enumerate(moved["cat0"]["rows"]):
    if row["variant"] == TREAT:
      rung = moved["cat0"]["budgets"]["100"][i]["rungs"][3]
      for m in ("pixel_ap", "image_auroc"):
        rung["metrics"][m] += 0.2 + 0.05 * row["seed"]
        rung["boot"][m] = [v + 0.2 + 0.05 * row["seed"] for v in rung["boot"][m]]
  b = _run(moved)
  kept = lambda lad: {k: v for k, v in _slopes(lad).items() if k[1] != "with_clipped"}
  assert kept(a) == kept(b)
  # The sensitivity that includes the clipped rungs does see it.
  assert _slopes(a)[("pixel_ap", "with_clipped")] != _slopes(b)[("pixel_ap", "with_clipped")]
  assert a["dose"]["pixel_ap"]["with_clipped"]["categories"]["cat0"]["rungs"] == [0, 1, 2, 3, 4]
  ap = a["dose"]["pixel_ap"]["absolute"]
  assert ap["excluded"]["cat0"] == [3] and ap["categories"]["cat0"]["rungs"] == [0, 1, 2, 4]
  assert all(ap["excluded"][c] == [] for c in ("cat1", "cat2", "cat3"))
  # The rung stays in the table, with its own (changed) numbers.
  row = lambda lad: next(r for r in lad["rungs"] if r["category"] == "cat0" and r["index"] == 3)
  assert not row(a)["in_slope"] and row(b)["pixel_ap"]["delta"]["mean"] > \
      row(a)["pixel_ap"]["delta"]["mean"] + 15
  # Left in, the same change moves the slope.
  moved["cat0"]["ladder"][3].update(in_slope=True, why_out=None)
  assert _slopes(_run(moved)) != _slopes(_run(planted))


def test_no_ladder_gives_none(planted):
  bare = copy.deepcopy(planted)
  for res in bare.values():
    del res["ladder"], res["padim_rungs"]
  assert _run(bare) is None
  for res in bare.values():
    res["ladder"] = []
  assert _run(bare) is None
  with pytest.raises(ValueError, match="report.slope_margin"):
    L.ladder_conclusions(_cfg(0.0), planted, BASE, TREAT)


def test_report_lines_carry_the_verdict_and_every_category(planted):
  lad = _run(planted)
  answer = L.answer_line(lad, TREAT, BASE)
  section = "\n".join(L.section_lines(lad, TREAT, BASE))
  for text in (answer, section):
    assert DR.GROWS in text and TREAT in text and BASE in text
    for c in planted:
      assert c in text, c
  p = lad["dose"]["pixel_ap"]["absolute"]["pooled"]
  assert f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]" in answer
  assert "modified HKSJ" in answer          # k = 4: the sensitivity is shown
  assert section.count("| cat0 | s") == 5   # one table row per rung


def test_without_resamples_the_ladder_falls_back_to_the_seed_spread():
  lad = _run(_results(0, slope=0.3, n_boot=0))
  ap = lad["dose"]["pixel_ap"]["absolute"]
  assert ap["not_estimable"] == {} and lad["verdict"] == DR.GROWS
  assert all(s["se_test"] == 0 for s in ap["categories"].values())


def test_a_left_out_rung_without_a_covariate_does_not_stop_the_answer(planted):
  out = copy.deepcopy(planted)
  out["cat0"]["ladder"][4].update(auroc_cal=None, in_slope=False, why_out="not calibrated")
  lad = _run(out)
  assert lad["dose"]["pixel_ap"]["absolute"]["categories"]["cat0"]["rungs"] == [0, 1, 2, 3]
  assert "—" in "\n".join(L.section_lines(lad, TREAT, BASE))   # x shown as missing
