"""Study A's within-category dose–response on the difficulty ladder (``data.ladder``).

The same trained rows of a category are scored at the last budget on its ladder's rungs
(``tailjax.data.ladder``): test sets that differ only in defect strength, each rung's
strength calibrated on the calibration split so that PaDiM's image AUROC there (the
rung covariate x, in pp) is fixed before any flow is trained. Per category c, rung j
and seed s the paired effect is ``Δ_{c,j,s}`` = tail-aware − mean-only (pixel AP or image
AUROC, pp), and on every bootstrap resample r of the rung's test images (the same
resamples for every row and every rung, ``evaluation.test_weights``) ``Δ_{c,j,s,r}``.

Rules, fixed before any run (printed in the report):

* **Per rung**: the mean over seeds of Δ with a 95 % interval that combines the seed
  spread and the test-image bootstrap (``stats.seed_test_interval``).
* **Dose–response** (``tailjax.dose_response``, two stages): per category the OLS slope
  of Δ on x over its rungs with ``in_slope`` (clipped share ≤ ``ladder.CLIP_LIMIT`` and a
  strength of its own), per seed, then pooled across categories by random effects
  (REML τ², HKSJ 95 % CI on k − 1 df, the prediction interval for a new category, the
  modified HKSJ interval as a sensitivity). Why two stages rather than a mixed model:
  each category's slope is a contrast within that category (its intercept cancels), and
  its variance takes both the seeds and the test images; the mixed model needs the
  covariate centred per category for the same separation and has no place for the
  bootstrap variance. Verdict on the pooled pixel-AP slope: "grows with detectability"
  iff its CI lies above 0, "shrinks" iff below, "no dose–response" iff TOST shows the
  slope inside ±``report.slope_margin`` pp per pp, else "not established".
* **Relative scale** (sensitivity): the same on ``(tail − mean) / mean``, so a constant
  relative gain on a baseline that rises with x does not read as a dose–response.
* **Clipped rungs included** (sensitivity, ``with_clipped``): the absolute slope over
  every rung with a strength of its own, so the report shows how much the clipping
  limit decides; never the verdict.

The tier contrast of ``study_a_conclusions.by_regime`` changes the photographs, the
defect generator, the mask rule and the strength at once; the report shows it as a
confounded description beside this answer, never as a dose–response.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tailjax import dose_response as dr
from tailjax import metaanalysis, reporting
from tailjax.evaluation import METRIC_NAMES

METRICS = ("pixel_ap", "image_auroc")
COVARIATE = "PaDiM image AUROC on the calibration split"
# The equivalence bound of the pooled slope when a config sets no ``report.slope_margin``:
# pp of Δ per pp of the covariate. 0.1 moves Δ by 3.7 pp over the ladder's span (60 → 97
# % AUROC), half the tier difference the cross-category reading attributed to
# detectability; a slope inside ±0.1 cannot carry a claim that the effect grows with it.
SLOPE_MARGIN = 0.1


def slope_margin(cfg) -> float:
  """``report.slope_margin`` (pp per pp, > 0), or ``SLOPE_MARGIN``."""
  m = float(cfg.report.get("slope_margin", SLOPE_MARGIN))
  if not m > 0:
    raise ValueError(f"config.report.slope_margin must be > 0 (pp per pp), got {m}")
  return m


def _arms(results: dict, cat: str, base: str, treat: str, metric: str):
  """(tail [J, S], mean [J, S], tail [J, S, R], mean [J, S, R]) in pp, seeds in order."""
  res = results[cat]
  last = str(max(int(s) for s in res["budgets"]))
  recs = res["budgets"][last]
  by = {(r["variant"], r["seed"]): recs[i]["rungs"] for i, r in enumerate(res["rows"])}
  seeds = sorted(s for v, s in by if v == base)
  pick = lambda v, key: np.array(
      [[(by[(v, s)][j]["metrics"][metric] if key is None else by[(v, s)][j]["boot"][metric])
        for s in seeds] for j in range(len(res["ladder"]))], np.float64) * 100
  return pick(treat, None), pick(base, None), pick(treat, "boot"), pick(base, "boot")


def _pooled_json(p: metaanalysis.PooledEffect | None) -> dict | None:
  if p is None:
    return None
  return {"mean": p.mu, "se": p.se, "lo": p.ci[0], "hi": p.ci[1], "p": p.p_value,
          "tau2": p.tau2, "i2": p.i2, "q": p.q, "q_df": p.q_df, "q_p": p.q_p_value, "k": p.k,
          "pi_lo": p.pi[0], "pi_hi": p.pi[1], "pi_df": p.pi_df,
          "ci_modified": list(p.ci_modified), "method": p.method, "ci_method": p.ci_method}


def _dose_json(d: dr.DoseResponse) -> dict:
  eq = d.equivalence
  return {"scale": d.scale, "verdict": d.verdict, "margin": d.margin,
          "pooled": _pooled_json(d.pooled),
          "equivalence": None if eq is None else eq._asdict(),
          "categories": {s.category: {"mean": s.slope, "lo": s.ci[0], "hi": s.ci[1],
                                      "se": s.se, "se_seed": s.se_seed, "se_test": s.se_test,
                                      "df": s.df, "rungs": list(s.rungs),
                                      "slopes_per_seed": list(s.slopes_S)}
                         for s in d.categories},
          "not_estimable": dict(d.not_estimable),
          "excluded": {c: list(v) for c, v in d.excluded.items()}}


def ladder_conclusions(cfg, results: dict, base: str, treat: str) -> dict | None:
  """The dose–response answer of a run scored on a ladder (module docstring), or None
  when its categories carry no ladder (``results[c]["ladder"]``).

  Returns ``{"covariate", "step", "margin", "rungs": [per category and rung: facts,
  PaDiM, both arms' mean over seeds, Δ intervals], "dose": {metric: {"absolute",
  "relative", "with_clipped"}}, "verdict": the pixel-AP verdict}``."""
  cats = [c for c in results if results[c].get("ladder")]
  if not cats:
    return None
  margin = slope_margin(cfg)
  x = [np.array([100 * (r["auroc_cal"] if r["auroc_cal"] is not None else np.nan)
                 for r in results[c]["ladder"]]) for c in cats]
  # A rung without a covariate (strengths given by hand) is shown but has no place on x.
  include = [np.array([bool(r["in_slope"]) for r in results[c]["ladder"]]) & np.isfinite(xc)
             for c, xc in zip(cats, x)]
  distinct = [np.array([r["why_out"] is None or r["why_out"].startswith("clipped")
                        for r in results[c]["ladder"]]) & np.isfinite(xc)
              for c, xc in zip(cats, x)]
  arms = {k: [_arms(results, c, base, treat, k) for c in cats] for k in METRICS}
  dose: dict[str, Any] = {}
  tables = {}
  for k in METRICS:
    t, m, tr, mr = (list(a) for a in zip(*arms[k]))
    delta = [a - b for a, b in zip(t, m)]
    reps = [a - b for a, b in zip(tr, mr)]
    if any(r.shape[-1] == 0 for r in reps):   # eval.n_boot = 0: the seed spread alone
      reps = tr = mr = None
    absolute = dr.dose_response(delta, x, replicates=reps, include=include, categories=cats,
                                margin=margin if k == "pixel_ap" else None)
    # The relative scale needs a mean-only value > 0: a rung where some seed's is not
    # (e.g. image AUROC 0 on a tiny test set) leaves its slope, a resample where it is
    # not drops out of the bootstrap.
    pos = lambda a: np.where(a > 0, a, np.nan)
    rel_include = [inc & (mj > 0).all(1) for inc, mj in zip(include, m)]
    relative = dr.dose_response_relative(
        t, [pos(a) for a in m], x, tail_replicates=tr,
        mean_replicates=None if mr is None else [pos(a) for a in mr],
        include=rel_include, categories=cats)
    # Sensitivity: every rung with a strength of its own, clipped ones included (where
    # "stronger" is partly a flat blob at 0 or 255): how much the clipping limit decides.
    with_clipped = dr.dose_response(delta, x, replicates=reps, include=distinct,
                                    categories=cats)
    dose[k] = {"absolute": _dose_json(absolute), "relative": _dose_json(relative),
               "with_clipped": _dose_json(with_clipped)}
    tables[k] = dr.rung_table(delta, x, replicates=reps, include=include, categories=cats,
                              bounds=(-100.0, 100.0))
  rungs = []
  for ci, c in enumerate(cats):
    for j, facts in enumerate(results[c]["ladder"]):
      row = {"category": c, **facts, "padim": results[c].get("padim_rungs", [{}] * (j + 1))[j]}
      for k in METRICS:
        t, m = arms[k][ci][0], arms[k][ci][1]
        cell = next(r for r in tables[k] if r["category"] == c and r["rung"] == j)
        row[k] = {"treat": float(t[j].mean()), "base": float(m[j].mean()),
                  "delta": {f: cell.get(f) for f in ("mean", "lo", "hi", "se", "se_seed",
                                                     "se_test", "n_seeds", "n_boot")}}
      rungs.append(row)
  return {"covariate": COVARIATE, "step": max(int(s) for s in results[cats[0]]["budgets"]),
          "margin": margin, "rungs": rungs, "dose": dose,
          "verdict": dose["pixel_ap"]["absolute"]["verdict"]}


# ----------------------------------------------------------------------------
# Report lines (``study_a_report`` places them)
# ----------------------------------------------------------------------------


def _ci(c: dict, digits: int = 2) -> str:
  return reporting.interval(c, digits=digits, signed=True)


def _pooled_text(p: dict | None, unit: str, digits: int = 3) -> str:
  if p is None:
    return f"not estimable (fewer than {dr.MIN_CATEGORIES} categories with a slope)"
  mod = p["ci_modified"]
  text = (f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}] {unit} "
          f"(REML, HKSJ, k = {p['k']}; 95 % prediction interval for a new category "
          f"[{p['pi_lo']:+.{digits}f}, {p['pi_hi']:+.{digits}f}]")
  if p["k"] <= 4 and np.isfinite(mod[0]):
    text += f"; modified HKSJ [{mod[0]:+.{digits}f}, {mod[1]:+.{digits}f}]"
  return text + f"; τ² = {p['tau2']:.3g}, I² = {100 * p['i2']:.0f} %)"


def answer_line(lad: dict, treat: str, base: str) -> str:
  """The answer's bullet: the pooled within-category slope of Δ pixel AP on the rung
  covariate, its relative-scale sensitivity, image AUROC, and the verdict."""
  ap = lad["dose"]["pixel_ap"]
  slopes = "; ".join(f"{c} {_ci(s, 3)}" for c, s in ap["absolute"]["categories"].items())
  out = ", ".join(f"{c} ({why})" for c, why in ap["absolute"]["not_estimable"].items())
  return (f"**Does the effect grow with detectability? (within categories, the difficulty "
          f"ladder)** Slope of Δ pixel AP ({treat} − {base}) on the rung's {lad['covariate']}, "
          f"pooled across categories: {_pooled_text(ap['absolute']['pooled'], 'pp per pp')}, "
          f"**{lad['verdict']}** (equivalence bound ±{lad['margin']:g} pp per pp). Per "
          f"category: {slopes or 'none estimable'}"
          + (f"; not estimable: {out}" if out else "")
          + ". Relative scale (Δ / mean-only): "
          f"{_pooled_text(ap['relative']['pooled'], 'per pp', 4)}, "
          f"**{ap['relative']['verdict']}**. With the clipped rungs included (sensitivity): "
          f"{_pooled_text(ap['with_clipped']['pooled'], 'pp per pp')}, "
          f"**{ap['with_clipped']['verdict']}**. Image AUROC: "
          f"{_pooled_text(lad['dose']['image_auroc']['absolute']['pooled'], 'pp per pp')}, "
          f"**{lad['dose']['image_auroc']['absolute']['verdict']}**. Rungs scored at step "
          f"{lad['step']}.")


def section_lines(lad: dict, treat: str, base: str) -> list[str]:
  """"Dose–response within categories": the rung table (facts, PaDiM, both arms, Δ with
  intervals counting seeds and test images), the per-category slopes on both scales and
  both metrics, and the pooled rows."""
  lines = ["## Dose–response within categories (the difficulty ladder)", "",
           f"The same trained rows, at step {lad['step']}, scored on every rung of each "
           "category's ladder: the same photographs, draws and exact masks, only the defect "
           f"strength differs. Covariate x: the rung's {lad['covariate']} (pp), fixed before "
           "any flow was trained. Clipped: share of mask pixels driven to 0 or 255; a rung "
           "above the clipping limit or repeating a weaker rung's strength is shown but left "
           "out of the slope. Δ = "
           f"{treat} − {base} (pp), mean over seeds with a 95 % interval combining the seed "
           "spread and a paired bootstrap over the rung's test images.", ""]
  body = []
  for r in lad["rungs"]:
    pad = r.get("padim") or {}
    body.append([r["category"], r["name"], f"{r['strength']:.3g}",
                 reporting.num(None if r["auroc_cal"] is None else 100 * r["auroc_cal"], ".1f"),
                 f"{100 * r['clipped']:.1f} %",
                 "yes" if r["in_slope"] else f"no ({r['why_out']})",
                 reporting.num(100 * pad["pixel_ap"] if "pixel_ap" in pad else None, ".1f"),
                 f"{r['pixel_ap']['base']:.1f}", f"{r['pixel_ap']['treat']:.1f}",
                 _ci(r["pixel_ap"]["delta"]), _ci(r["image_auroc"]["delta"])])
  lines += reporting.table(["category", "rung", "strength", "x (%)", "clipped", "in slope",
                            "PaDiM pixel AP", f"{base} pixel AP", f"{treat} pixel AP",
                            "Δ pixel AP (pp)", "Δ image AUROC (pp)"], body) + [""]
  body = []
  for k in METRICS:
    for scale, unit in (("absolute", "pp per pp"), ("relative", "per pp"),
                        ("with_clipped", "pp per pp")):
      d = lad["dose"][k][scale]
      for c, s in d["categories"].items():
        body.append([METRIC_NAMES[k], scale, c, _ci(s, 4), f"{s['se_seed']:.3g}",
                     f"{s['se_test']:.3g}", ", ".join(map(str, s["rungs"]))])
      for c, why in d["not_estimable"].items():
        body.append([METRIC_NAMES[k], scale, c, why, "", "", ""])
      body.append([METRIC_NAMES[k], scale, "**pooled**", _pooled_text(d["pooled"], unit, 4),
                   "", "", f"**{d['verdict']}**"])
  lines += ["Slopes of Δ on x per category (per seed, then the mean; its variance from the "
            "seeds and the test-image bootstrap) and pooled by random effects:", ""]
  lines += reporting.table(["metric", "scale", "category", "slope [95 % CI]", "se (seeds)",
                            "se (test images)", "rungs / verdict"], body)
  return lines + [""]
