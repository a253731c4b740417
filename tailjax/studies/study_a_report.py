"""Study A's conclusions: budget curve, model selection without the test set, the causal
chain, per-category verdicts with multiplicity correction, and the report.

Rules, fixed before any run (they are printed in the report):

* **Primary evaluation point.** Each row is read at the step its *validation* NLL
  selects (lowest mean patch NLL of the held-out normal training images over the
  budget ladder); without a validation split, at the last step. The test set is
  never used to choose anything.
* **Plateau rule** (reported beside it): the earliest budget s whose validation NLL
  is within ``eval.plateau_tol`` (relative) of the best value at any later budget.
* **Per-category verdicts**: paired t-tests over seeds of tail − mean, Holm-corrected
  over the categories; pooled reading "better"/"worse" when every significant
  category agrees in sign, "mixed" when significant effects of both signs exist.
  Heterogeneity: Cochran's Q / I² on the per-category differences.
* **Budget dependence**: the sign "depends on the budget" when the pooled mean
  difference has different signs at two trained budgets (s > 0); the budgets where
  its 95 % CI excludes 0 are listed.
* **Causal links** (``tailjax.analysis.causal``): L1 beyond construction iff the
  tail-aware model's excess share CI (over images) lies above 0 in every category;
  L2 supported iff the pooled paired difference of the normal tail gap
  (p99.5 − p50 of held-out normal patch NLL) lies below 0; L3 supported iff the
  pooled paired difference of border-band pixel AP lies above 0 *and* exceeds the
  interior's; L4 = the pooled pixel-AP reading. The link p-values are
  Holm-corrected together; everything else in the report is descriptive.
* **By regime** (``by_regime``; runs with ≥ 2 categories): per category, per tier
  (texture tiers ``hard`` / ``calibrated``; one tier "—" for other data kinds) and
  pooled, the tail − mean pixel AP and image AUROC at the primary point. Pooled two
  ways: the seed-paired estimate (mean over categories per seed, t-interval over seeds)
  and a random-effects estimate across categories (REML τ², HKSJ 95 % CI; τ² and I² shown)
  on per-category (mean difference, seed variance / S), the seed variance pooled over
  the scope's categories (a category's own variance from 3 seeds is too noisy to weight
  by: ``metaanalysis.effects_from_seeds``); "tail-aware better" / "worse"
  iff that CI lies above / below 0. A meta-regression of the per-category effect on the
  mean-only model's image AUROC (its detectability) gives the slope: "the tail-aware
  effect grows with detectability" iff the slope's 95 % CI (HKSJ) lies above 0,
  "shrinks" iff below, else "no dependence on detectability shown". With k < 3
  categories (in the scope) these rows read "not estimable (k < 3)"; they are
  descriptive, outside the Holm families above.
* **Exact vs approximate per-patch NLL** (``nll_comparison``; runs with a variant whose
  ``tail_nll`` is "sq_norm" or "even_share"): each tail-aware variant − baseline and each
  approximate variant − the exact treatment, by tier and over all categories.
  "The seed's gain could come from the approximation" iff an approximate variant's
  pixel-AP difference to the baseline (random effects across all categories; seed-paired
  when not estimable) has its CI above 0 while the exact treatment's does not;
  descriptive, outside the Holm families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tailjax import metaanalysis, reporting
from tailjax.analysis import causal
from tailjax.evaluation import METRIC_KEYS, METRIC_NAMES
from tailjax.stats import mean_ci

STUDY_COUPLING_STEPS = 8


def rules_bullets() -> list[str]:
  """The module docstring's rules as markdown bullets (one source for code and report)."""
  text = __doc__.split("printed in the report):", 1)[1]
  items = [" ".join(part.split()) for part in text.split("\n* ") if part.strip()]
  return [f"- {(item[2:] if item.startswith('* ') else item).replace('``', '`')}" for item in items]


# ----------------------------------------------------------------------------
# Reading the per-budget records
# ----------------------------------------------------------------------------


def budgets(results: dict) -> list[int]:
  first = next(iter(results.values()))
  return sorted(int(s) for s in first["budgets"])


def _record(results, cat, step: int, i: int) -> dict:
  return results[cat]["budgets"][str(step)][i]


def selected_steps(results: dict, cat: str, rule: str, tol: float) -> list[int] | None:
  """Per row of ``cat``: the step chosen by ``rule`` ("val" or "plateau") from the
  validation NLL alone; None without a validation split."""
  steps = budgets(results)
  rows = results[cat]["rows"]
  if "val" not in _record(results, cat, steps[-1], 0):
    return None
  out = []
  for i in range(len(rows)):
    v = np.array([_record(results, cat, s, i)["val"]["mean"] for s in steps])
    if rule == "val":
      out.append(steps[int(np.nanargmin(v))])
    elif rule == "plateau":
      later_best = np.minimum.accumulate(v[::-1])[::-1]
      ok = np.where(v - later_best <= tol * np.abs(v))[0]
      out.append(steps[int(ok[0])])
    else:
      raise ValueError(f"unknown selection rule {rule!r}")
  return out


def view(results: dict, steps_by_cat: dict[str, list[int]]) -> dict:
  """A results dict whose rows carry the records at the given per-row steps."""
  out = {}
  for c, res in results.items():
    rows = []
    for i, r in enumerate(res["rows"]):
      rec = _record(results, c, steps_by_cat[c][i], i)
      rows.append({**r, "metrics": rec["metrics"], "record": rec, "step": steps_by_cat[c][i]})
    out[c] = {**res, "rows": rows}
  return out


def at_step(results: dict, step: int) -> dict:
  return view(results, {c: [step] * len(r["rows"]) for c, r in results.items()})


def paired(results_view: dict, base: str, treat: str, value) -> dict[str, np.ndarray]:
  """Per category: treat − base per seed of ``value(row)`` (seed-paired)."""
  out = {}
  for c, res in results_view.items():
    by = {(r["variant"], r["seed"]): value(r) for r in res["rows"]}
    seeds = sorted(s for v, s in by if v == base)
    out[c] = np.array([by[(treat, s)] - by[(base, s)] for s in seeds], np.float64)
  return out


def pooled(per_cat: dict[str, np.ndarray]) -> np.ndarray:
  """Per seed, the mean over categories (categories where a value is undefined drop out)."""
  stacked = np.stack(list(per_cat.values()))
  ok = np.isfinite(stacked)
  total = np.where(ok, stacked, 0.0).sum(0)
  count = ok.sum(0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------
# Conclusions
# ----------------------------------------------------------------------------


def conclusions(cfg, results: dict, analysis: dict | None = None) -> dict:
  """Everything the report states, as numbers (also saved in metrics.json)."""
  base, treat = cfg.report.baseline, cfg.report.treatment
  tol = float(cfg.eval.plateau_tol)
  steps = budgets(results)
  cats = list(results)
  sel = {rule: {c: selected_steps(results, c, rule, tol) for c in cats}
         for rule in ("val", "plateau")}
  has_val = all(v is not None for v in sel["val"].values())
  primary_steps = sel["val"] if has_val else {c: [steps[-1]] * len(results[c]["rows"])
                                              for c in cats}
  primary = view(results, primary_steps)
  ap = lambda r: r["metrics"]["pixel_ap"]
  out: dict[str, Any] = {"primary": "val" if has_val else "final", "budgets": steps,
                         "selected": {r: v for r, v in sel.items() if has_val}}
  if has_val:
    plateau = [s for c in cats for s in sel["plateau"][c]]
    out["plateau_rows"] = {"before_last": int(sum(s < steps[-1] for s in plateau)),
                           "rows": len(plateau)}

  # Per-category verdicts at the primary point (pixel AP and image AUROC).
  out["verdicts"] = {k: causal.category_verdicts(paired(primary, base, treat,
                                                        lambda r, k=k: r["metrics"][k]))
                     for k in ("pixel_ap", "image_auroc")}
  out["pooled_diff"] = {k: causal.paired_test(pooled(paired(primary, base, treat,
                                                            lambda r, k=k: r["metrics"][k])))
                        for k in METRIC_KEYS}

  # The budget curve.
  curve = {}
  for s in steps:
    v = at_step(results, s)
    curve[s] = {"pooled": causal.paired_test(pooled(paired(v, base, treat, ap))),
                "categories": {c: causal.paired_test(d)
                               for c, d in paired(v, base, treat, ap).items()}}
  out["curve"] = curve
  trained = [s for s in steps if s > 0]
  signs = {s: np.sign(curve[s]["pooled"]["mean"]) for s in trained}
  out["budget_sign"] = {
      "depends": len({x for x in signs.values() if x != 0}) > 1,
      "significant": {s: reporting.side_of_zero(curve[s]["pooled"]) for s in trained
                      if reporting.side_of_zero(curve[s]["pooled"]) != 0},
      "signs": {s: int(x) for s, x in signs.items()}}

  # The causal chain (L2, L3 from the evaluation records; L1 from the analysis).
  links = {}
  if has_val:
    gap = paired(primary, base, treat, lambda r: r["record"]["val"]["gap"])
    p995 = paired(primary, base, treat, lambda r: r["record"]["val"]["p99.5"])
    links["L2"] = {"gap": causal.paired_test(pooled(gap)),
                   "p99.5": causal.paired_test(pooled(p995)),
                   "fpr": causal.paired_test(pooled(paired(
                       primary, base, treat, lambda r: r["record"]["boundary"]["all"]["fpr_at_tpr"]))),
                   "categories": {c: causal.paired_test(d) for c, d in gap.items()}}
    links["L2"]["verdict"] = ("SUPPORTED" if reporting.side_of_zero(links["L2"]["gap"]) < 0
                              else "NOT SUPPORTED")
  band = pooled(paired(primary, base, treat, lambda r: r["record"]["boundary"]["band"]["ap"]))
  inner = pooled(paired(primary, base, treat, lambda r: r["record"]["boundary"]["interior"]["ap"]))
  l3 = {"band": causal.paired_test(band), "interior": causal.paired_test(inner),
        "band_minus_interior": causal.paired_test(band - inner)}
  up = reporting.side_of_zero(l3["band"]) > 0
  l3["verdict"] = ("SUPPORTED" if up and l3["band"]["mean"] > l3["interior"]["mean"] else
                   "PARTIAL" if up else "NOT SUPPORTED")
  links["L3"] = l3
  # L2 and L3 with both models read at the same step (descriptive): the primary point
  # compares each row at its own selected step, which mixes the loss with training length.
  same_step = {}
  for s in trained:
    v = at_step(results, s)
    d = lambda f: causal.paired_test(pooled(paired(v, base, treat, f)))
    same_step[s] = {"band": d(lambda r: r["record"]["boundary"]["band"]["ap"]),
                    "interior": d(lambda r: r["record"]["boundary"]["interior"]["ap"])}
    if has_val:
      same_step[s]["gap"] = d(lambda r: r["record"]["val"]["gap"])
      same_step[s]["p99.5"] = d(lambda r: r["record"]["val"]["p99.5"])
  out["links_same_step"] = same_step
  if analysis is not None:
    l1 = {c: a["l1"] for c, a in analysis["categories"].items() if "l1" in a}
    if l1:
      beyond = all(v["treatment"]["beyond"] for v in l1.values())
      links["L1"] = {"categories": l1,
                     "verdict": "BEYOND CONSTRUCTION" if beyond else "BY CONSTRUCTION"}
  vp = out["verdicts"]["pixel_ap"]
  links["L4"] = {"pooled": out["pooled_diff"]["pixel_ap"], "reading": vp["pooled"],
                 "verdict": {"better": "SUPPORTED", "worse": "CONTRADICTED",
                             "mixed": "MIXED"}.get(vp["pooled"], "NOT SUPPORTED")}
  # Holm over the links' pooled tests.
  names, ps = [], []
  for name, key in (("L2", "gap"), ("L3", "band"), ("L4", "pooled")):
    if name in links:
      names.append(name)
      ps.append(links[name][key]["p"])
  if "L1" in links:
    for c, v in links["L1"]["categories"].items():
      names.append(f"L1 {c}")
      ps.append(v["treatment"]["excess"]["p"])
  out["link_holm"] = dict(zip(names, (float(x) for x in causal.holm(ps))))
  out["links"] = links
  out["n_seeds"] = len({r["seed"] for r in next(iter(results.values()))["rows"]})
  if len(cats) >= 2:
    out["by_regime"] = by_regime(cfg, primary)
  nll = nll_comparison(cfg, primary)
  if nll is not None:
    out["tail_nll"] = nll
  return out


# ----------------------------------------------------------------------------
# The answer by regime: categories, tiers, random effects, meta-regression
# ----------------------------------------------------------------------------

REGIME_METRICS = ("pixel_ap", "image_auroc")
MIN_META_K = 3        # categories a random-effects / meta-regression row needs
COVARIATE = "mean-only image AUROC"


def category_regime(cfg, category: str) -> str:
  """The tier of a category: ``textures.category_tier`` for ``data.kind=textures``
  ("hard" / "calibrated"); "—" (one tier) for every other data kind."""
  data = cfg.get("data") if hasattr(cfg, "get") else None
  if data is not None and data.get("kind") == "textures":
    from tailjax.data import textures
    return textures.category_tier(category)
  return reporting.DASH


def _not_estimable(reason: str) -> dict:
  return {"estimable": False, "reason": f"not estimable ({reason})"}


def _meta_inputs(diffs: dict[str, np.ndarray]):
  """(y_K, v_K) = ``metaanalysis.effects_from_seeds`` (seed variance pooled over the
  categories) of the finite per-seed differences, or the reason why not (k < 3, a
  category with < 2 seeds, no seed variance at all)."""
  if len(diffs) < MIN_META_K:
    return _not_estimable(f"k < {MIN_META_K}")
  rows = {c: d[np.isfinite(d)] for c, d in diffs.items()}
  few = [c for c, d in rows.items() if d.size < 2]
  if few:
    return _not_estimable(f"< 2 seeds in {', '.join(few)}")
  y_K, v_K = metaanalysis.effects_from_seeds(list(rows.values()), pool_variance=True)
  if not (v_K > 0).all():
    return _not_estimable("zero seed variance in every category")
  return y_K, v_K


def _ci(mean, se, ci, p) -> dict:
  return {"mean": float(mean), "se": float(se), "lo": float(ci[0]), "hi": float(ci[1]),
          "p": float(p)}


def regime_random_effects(diffs: dict[str, np.ndarray]) -> dict:
  """Random-effects pooled tail − mean over the categories of ``diffs`` (per category,
  per-seed differences): ``metaanalysis.random_effects`` (REML, HKSJ) on
  ``y_i = mean_s d_is``, ``v_i = s²_pooled / S``, and its verdict (CI vs 0)."""
  inputs = _meta_inputs(diffs)
  if isinstance(inputs, dict):
    return inputs
  re = metaanalysis.random_effects(*inputs, method="reml", ci="hksj")
  out = {"estimable": True, **_ci(re.mu, re.se, re.ci, re.p_value), "tau2": re.tau2,
         "tau2_lo": re.tau2_ci[0], "tau2_hi": re.tau2_ci[1], "i2": re.i2, "q": re.q,
         "q_df": re.q_df, "q_p": re.q_p_value, "k": re.k, "method": re.method,
         "ci_method": re.ci_method}
  out["verdict"] = reporting.difference_verdict(out, "tail-aware better", "tail-aware worse")
  return out


def regime_meta_regression(diffs: dict[str, np.ndarray], x: dict[str, float]) -> dict:
  """Random-effects meta-regression ``y_i = a + b · x_i`` of the per-category tail − mean
  on ``x`` (the mean-only model's image AUROC): ``metaanalysis.meta_regression`` (REML,
  HKSJ on k − 2 df). ``b`` is in effect units per covariate unit (pp per pp). Verdict:
  "grows" iff b's CI lies above 0, "shrinks" iff below, else no dependence shown."""
  inputs = _meta_inputs(diffs)
  if isinstance(inputs, dict):
    return inputs
  x_K = np.array([x[c] for c in diffs], np.float64)
  if not np.isfinite(x_K).all() or np.ptp(x_K) == 0:
    return _not_estimable(f"{COVARIATE} undefined or equal in every category")
  mr = metaanalysis.meta_regression(*inputs, x_K, method="reml", ci="hksj")
  slope = _ci(mr.slope, mr.se_slope, mr.ci_slope, mr.p_slope)
  side = reporting.side_of_zero(slope)
  verdict = {1: "the tail-aware effect grows with detectability (slope CI above 0)",
             -1: "the tail-aware effect shrinks with detectability (slope CI below 0)"
             }.get(side, "no dependence on detectability shown (slope CI contains 0)")
  return {"estimable": True, "slope": slope,
          "intercept": _ci(mr.intercept, mr.se_intercept, mr.ci_intercept, np.nan),
          "tau2": mr.tau2, "i2": mr.i2, "q_e": mr.q_e, "q_df": mr.q_df, "q_p": mr.q_p_value,
          "k": mr.k, "method": mr.method, "ci_method": mr.ci_method, "verdict": verdict}


def by_regime(cfg, primary: dict, base: str | None = None, treat: str | None = None) -> dict:
  """The answer by regime, from ``primary`` = ``view(results, steps)`` at the primary
  point (``conclusions``: the validation-selected step of each row).

  Per category ``c`` with seeds s: ``d_cs`` = tail − mean (``paired``) of pixel AP and
  image AUROC, its ``causal.paired_test`` and the covariate ``x_c`` = the mean over
  seeds of the mean-only rows' image AUROC. Per tier T (``category_regime``) and for
  all categories: the seed-paired estimate ``paired_test(pooled(d over c ∈ T))`` and
  ``regime_random_effects``; for all categories also ``regime_meta_regression`` of
  the per-category effect on ``x``. (The covariate is the baseline's own test metric:
  its noise enters Δ image AUROC with a minus sign, biasing that slope downwards
  — regression to the mean — so the pixel-AP slope is the cleaner reading.)

  Returns ``{"covariate", "categories": {c: {"tier", "covariate", metric: test}},
  "tiers": {T: {"categories", metric: {"seed_paired", "random_effects"}}},
  "pooled": {metric: {"seed_paired", "random_effects", "meta_regression"}}}``.
  ``base`` / ``treat``: the two variants (default ``report.baseline`` / ``treatment``).
  """
  base, treat = base or cfg.report.baseline, treat or cfg.report.treatment
  cats = list(primary)
  tier = {c: category_regime(cfg, c) for c in cats}
  diffs = {k: paired(primary, base, treat, lambda r, k=k: r["metrics"][k])
           for k in REGIME_METRICS}
  x = {c: float(np.mean([r["metrics"]["image_auroc"] for r in primary[c]["rows"]
                         if r["variant"] == base])) for c in cats}
  out = {"covariate": f"image AUROC of the {base} rows at their selected step, mean over seeds",
         "categories": {c: {"tier": tier[c], "covariate": x[c],
                            **{k: causal.paired_test(diffs[k][c]) for k in REGIME_METRICS}}
                        for c in cats},
         "tiers": {}, "pooled": {}}
  for t in dict.fromkeys(tier.values()):
    members = [c for c in cats if tier[c] == t]
    out["tiers"][t] = {"categories": members}
    for k in REGIME_METRICS:
      d = {c: diffs[k][c] for c in members}
      out["tiers"][t][k] = {"seed_paired": causal.paired_test(pooled(d)),
                            "random_effects": regime_random_effects(d)}
  for k in REGIME_METRICS:
    out["pooled"][k] = {"seed_paired": causal.paired_test(pooled(diffs[k])),
                        "random_effects": regime_random_effects(diffs[k]),
                        "meta_regression": regime_meta_regression(diffs[k], x)}
  return out


def tail_nll_variants(cfg) -> dict[str, str]:
  """{variant: its ``tail_nll``} for the run's variants with λ > 0, treatment first."""
  v = cfg.variants
  names = [cfg.report.treatment] + [n for n in v if n != cfg.report.treatment]
  return {n: str(v[n].get("tail_nll", "exact")) for n in names
          if n != cfg.report.baseline and float(v[n].tail_weight) > 0}


def _scopes(br: dict, k: str) -> dict:
  """{scope: {"seed_paired", "random_effects"}} of ``by_regime`` for metric k: each
  tier (when there are several) and "all"."""
  out = {t: v[k] for t, v in br["tiers"].items()} if len(br["tiers"]) > 1 else {}
  return {**out, "all": {x: br["pooled"][k][x] for x in ("seed_paired", "random_effects")}}


def nll_comparison(cfg, primary: dict) -> dict | None:
  """Exact vs approximate per-patch NLL in the tail (``losses.NLL_DEFINITIONS``), or None
  when the run has no approximate variant or no exact treatment.

  For every tail-aware variant V (the treatment, exact, and each approximate one A):
  V − baseline per scope (tier, all) and metric, seed-paired and random effects (as
  ``by_regime``); for each A also A − treatment (the approximation's own effect).
  Verdict, fixed before the run, on pixel AP across all categories by random effects
  (seed-paired when random effects is not estimable): "the seed's gain could come from
  the approximation" iff some A − baseline CI lies above 0 while the exact treatment's
  does not; "the approximation gains, and so does the exact loss" iff both lie above 0;
  otherwise "the approximation does not produce a gain here" — and per A, the
  A − treatment reading: better / worse / no difference shown (CI vs 0).
  """
  if "variants" not in cfg:
    return None
  defs = tail_nll_variants(cfg)
  treat = cfg.report.treatment
  approx = [n for n, d in defs.items() if d != "exact"]
  if not approx or defs.get(treat) != "exact":
    return None
  base = cfg.report.baseline
  out: dict[str, Any] = {"baseline": base, "exact": treat, "definitions": defs, "variants": {}}

  gains = {}
  for name in [treat, *approx]:
    br = by_regime(cfg, primary, base=base, treat=name)
    rec = {"tail_nll": defs[name],
           "vs_baseline": {k: _scopes(br, k) for k in REGIME_METRICS}}
    gains[name] = reporting.side_of_zero(_headline(rec["vs_baseline"]["pixel_ap"])) > 0
    if name != treat:
      bx = by_regime(cfg, primary, base=treat, treat=name)
      rec["vs_exact"] = {k: _scopes(bx, k) for k in REGIME_METRICS}
      side = reporting.side_of_zero(_headline(rec["vs_exact"]["pixel_ap"]))
      rec["vs_exact_reading"] = {1: "better than exact", -1: "worse than exact"}.get(
          side, "no difference from exact shown")
    out["variants"][name] = rec
  if any(gains[a] for a in approx) and not gains[treat]:
    out["verdict"] = "the seed's gain could come from the approximation"
  elif any(gains[a] for a in approx):
    out["verdict"] = "the approximation gains, and so does the exact loss"
  else:
    out["verdict"] = "the approximation does not produce a gain here"
  return out


def _headline(scopes: dict) -> dict:
  """The "all" scope's random-effects interval, or its seed-paired one if not estimable."""
  re = scopes["all"]["random_effects"]
  return re if re.get("estimable") else scopes["all"]["seed_paired"]


def _effect_text(scope: dict) -> str:
  re = scope["random_effects"]
  return (f"{_pp(scope['seed_paired'])}; RE {_pp(re)}" if re.get("estimable")
          else f"{_pp(scope['seed_paired'])}; RE {re['reason']}")


def nll_section(cfg, con: dict) -> list[str]:
  """"Exact vs approximate per-patch NLL": the table of ``nll_comparison`` and its
  verdict; [] when the run has no approximate variant."""
  nc = con.get("tail_nll")
  if not nc:
    return []
  body = []
  for name, rec in nc["variants"].items():
    for scope in rec["vs_baseline"]["pixel_ap"]:
      row = [name, rec["tail_nll"], scope,
             _effect_text(rec["vs_baseline"]["pixel_ap"][scope]),
             _effect_text(rec["vs_baseline"]["image_auroc"][scope])]
      row += ([_effect_text(rec["vs_exact"]["pixel_ap"][scope]),
               _effect_text(rec["vs_exact"]["image_auroc"][scope])]
              if "vs_exact" in rec else [reporting.DASH, reporting.DASH])
      body.append(row)
  lines = ["## Exact vs approximate per-patch NLL in the tail", "",
           "The tail (top-k selection and its average) ranked by the exact per-location NLL, "
           "by ½‖z‖² alone (`sq_norm`), or by ½‖z‖² minus an even share of the image log-det "
           "(`even_share`, what a user of a flow that returns one log-det per image — "
           "anomalib/FrEIA FastFlow — can compute); the mean term is the exact mean NLL in "
           f"all. Differences in pp at the primary point: seed-paired (t over {con['n_seeds']} "
           "seeds) and random effects across the scope's categories (RE, REML, HKSJ).", ""]
  lines += reporting.table(
      ["variant", "tail NLL", "scope", f"Δ pixel AP vs {nc['baseline']}",
       f"Δ image AUROC vs {nc['baseline']}", f"Δ pixel AP vs {nc['exact']}",
       f"Δ image AUROC vs {nc['exact']}"], body)
  items = [f"{n} − {nc['exact']}: **{r['vs_exact_reading']}** (pixel AP, all categories)."
           for n, r in nc["variants"].items() if "vs_exact" in r]
  items.append(f"Could the seed's gain come from the approximation? **{nc['verdict']}** "
               "(rule: `study_a_report.nll_comparison`).")
  return lines + [""] + reporting.bullets(items) + [""]


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _pp(ci, digits=2) -> str:
  return reporting.interval(ci, scale=100, digits=digits, signed=True)


def _reading(v: dict) -> str:
  return {"better": "tail-aware better", "worse": "tail-aware worse", "mixed": "mixed",
          }.get(v["pooled"], "no significant difference")


def answer_lines(cfg, results: dict, con: dict) -> list[str]:
  base, treat = cfg.report.baseline, cfg.report.treatment
  vp = con["verdicts"]["pixel_ap"]
  at = ("at the step each row's validation NLL selects (held-out normal training images)"
        if con["primary"] == "val" else "at the last step (no validation split)")
  per_cat = "; ".join(
      f"{c} {_pp(v)} pp (Holm p = {reporting.pvalue(v['p_holm'])}"
      f"{', ' + ('better' if v['sign'] > 0 else 'worse') if v['sign'] else ''})"
      for c, v in vp["categories"].items())
  het = vp["heterogeneity"]
  bs = con["budget_sign"]
  curve = con["curve"]
  trained = [s for s in con["budgets"] if s > 0]
  sig = ", ".join(f"{s} ({'+' if v > 0 else '−'})" for s, v in bs["significant"].items()) or "none"
  lines = [
      f"**Pixel AP, {treat} − {base}, {at}:** pooled over categories "
      f"{_pp(con['pooled_diff']['pixel_ap'])} pp (95 % CI over {con['n_seeds']} seeds). "
      f"Per category (paired t-test, Holm-corrected over {len(vp['categories'])} categories): "
      f"{per_cat}. Reading: **{_reading(vp)}**"
      + (f"; categories differ (Cochran's Q = {het['q']:.1f}, p = {reporting.pvalue(het['p'])}, "
         f"I² = {100 * het['i2']:.0f} %)" if np.isfinite(het["p"]) and het["p"] < 0.05 else "")
      + ".",
      "**Does the answer depend on the training budget?** "
      + ("**Yes**: the pooled difference changes sign across budgets " if bs["depends"] else
         "**No**: the pooled difference keeps one sign at every trained budget ")
      + "(" + ", ".join(f"{s}: {_pp(curve[s]['pooled'])}" for s in trained) + "); "
      f"budgets where its CI excludes 0: {sig}. Figure: `budget_curve.png`.",
  ]
  vi = con["verdicts"]["image_auroc"]
  lines.append(f"Image AUROC at the same point: pooled {_pp(con['pooled_diff']['image_auroc'])} "
               f"pp, reading **{_reading(vi)}**.")
  if con["n_seeds"] < 3:
    lines.append(f"⚠ Only {con['n_seeds']} seed(s): a t-interval with {con['n_seeds'] - 1} "
                 "degree(s) of freedom is nearly meaningless; use ≥ 3 seeds for conclusions.")
  if int(cfg.flow.num_steps) != STUDY_COUPLING_STEPS:
    lines.append(f"This run uses {cfg.flow.num_steps} coupling steps; the SPEC's (and "
                 f"anomalib's) default is {STUDY_COUPLING_STEPS} "
                 "(`configs/fastflow_study.py:arch8` runs the study with it).")
  if "by_regime" in con:
    lines.append(regime_answer(con["by_regime"]))
  if "tail_nll" in con:
    nc = con["tail_nll"]
    parts = [f"{n} ({r['tail_nll']}) {_pp(_headline(r['vs_baseline']['pixel_ap']))} pp"
             for n, r in nc["variants"].items()]
    lines.append(f"**Exact vs approximate per-patch NLL** (pixel AP − {nc['baseline']}, all "
                 f"categories): {'; '.join(parts)}. **{nc['verdict']}**.")
  lines.append("The study reported +9.94 pp pixel AP (45.86 → 55.80 %) and image AUROC "
               "96.62 → 98.05 % on its own data, from single runs.")
  return lines


def _re_text(re: dict) -> str:
  if not re["estimable"]:
    return re["reason"]
  return (f"{_pp(re)} (τ² = {1e4 * re['tau2']:.3g} pp², I² = {100 * re['i2']:.0f} %)")


def _slope_text(mr: dict) -> str:
  if not mr["estimable"]:
    return mr["reason"]
  return (f"slope {reporting.interval(mr['slope'], signed=True)} pp per pp (HKSJ, "
          f"{mr['k'] - 2} df)")


def regime_answer(br: dict) -> str:
  """One answer bullet: pixel AP across categories by random effects and its slope on
  detectability (``by_regime``), with the verdicts."""
  ap = br["pooled"]["pixel_ap"]
  re, mr = ap["random_effects"], ap["meta_regression"]
  tiers = ", ".join(f"{t} {len(v['categories'])}" for t, v in br["tiers"].items())
  text = (f"{_pp(re)} pp (τ² = {1e4 * re['tau2']:.3g} pp², I² = {100 * re['i2']:.0f} %)"
          if re["estimable"] else re["reason"])
  head = (f"**By regime** ({len(br['categories'])} categories; tiers: {tiers}): pixel AP "
          f"random-effects pooled (REML, HKSJ) {text}")
  head += f", **{re['verdict']}**" if re["estimable"] else ""
  head += f"; on {COVARIATE}: {_slope_text(mr)}"
  return head + (f", **{mr['verdict']}**." if mr["estimable"] else ".")


def regime_section(cfg, con: dict) -> list[str]:
  """"The answer by regime" (``by_regime``): a table per category, per tier (when
  there are several) and over all categories, then the random-effects and
  meta-regression bullets; [] for a one-category run."""
  br = con.get("by_regime")
  if not br:
    return []
  cats = br["categories"]
  x = lambda members: f"{100 * np.mean([cats[c]['covariate'] for c in members]):.2f}"
  body = [[c, v["tier"], 1, x([c]), _pp(v["pixel_ap"]), _pp(v["image_auroc"])]
          for c, v in cats.items()]
  scopes = [(t, v["categories"], v) for t, v in br["tiers"].items()] if len(br["tiers"]) > 1 else []
  scopes.append(("all", list(cats), br["pooled"]))
  for name, members, v in scopes:
    body.append([f"{name}: seed-paired", name, len(members), x(members),
                 _pp(v["pixel_ap"]["seed_paired"]), _pp(v["image_auroc"]["seed_paired"])])
    body.append([f"{name}: random effects", name, len(members), x(members),
                 _re_text(v["pixel_ap"]["random_effects"]),
                 _re_text(v["image_auroc"]["random_effects"])])
  lines = ["## The answer by regime", "",
           f"{cfg.report.treatment} − {cfg.report.baseline} at the primary point, pp with 95 % "
           f"CI. Seed-paired: the mean over the scope's categories per seed, t-interval over "
           f"{con['n_seeds']} seeds. Random effects: across the scope's categories, each "
           "(mean difference, seed variance / S), REML τ², HKSJ interval. Detectability: "
           f"{br['covariate']}.", ""]
  lines += reporting.table(["scope", "tier", "k", f"{COVARIATE} (%)", "Δ pixel AP (pp)",
                            "Δ image AUROC (pp)"], body)
  items = []
  for k in REGIME_METRICS:
    re, mr = br["pooled"][k]["random_effects"], br["pooled"][k]["meta_regression"]
    name = METRIC_NAMES[k]
    if re["estimable"]:
      items.append(f"Δ {name} across all {re['k']} categories, random effects: {_pp(re)} pp, "
                   f"τ² = {1e4 * re['tau2']:.3g} pp² (Q-profile "
                   f"[{1e4 * re['tau2_lo']:.3g}, {1e4 * re['tau2_hi']:.3g}]), "
                   f"I² = {100 * re['i2']:.0f} %, Cochran's Q = {re['q']:.2f} on {re['q_df']} "
                   f"df (p = {reporting.pvalue(re['q_p'])}): **{re['verdict']}**.")
    else:
      items.append(f"Δ {name} across categories, random effects: {re['reason']}.")
    items.append(f"Does Δ {name} depend on detectability? Meta-regression on {COVARIATE}: "
                 + (f"{_slope_text(mr)}, residual τ² = {1e4 * mr['tau2']:.3g} pp²: "
                    f"**{mr['verdict']}**." if mr["estimable"] else f"{mr['reason']}."))
  return lines + [""] + reporting.bullets(items) + [""]


def budget_table(cfg, results: dict, con: dict) -> list[str]:
  base, treat = cfg.report.baseline, cfg.report.treatment
  cats = list(results)
  lines = []
  for scope in cats + (["pooled"] if len(cats) > 1 else []):
    body = []
    for s in con["budgets"]:
      v = at_step(results, s)
      vals = {}
      for var in (base, treat):
        for k in ("pixel_ap", "image_auroc"):
          per_seed = [np.mean([r["metrics"][k] for c in (cats if scope == "pooled" else [scope])
                               for r in v[c]["rows"] if r["variant"] == var and r["seed"] == sd])
                      for sd in sorted({r["seed"] for r in v[cats[0]]["rows"]})]
          vals[(var, k)] = per_seed
      d = con["curve"][s]["pooled" if scope == "pooled" else "categories"]
      d = d if scope == "pooled" else d[scope]
      di = causal.paired_test(np.subtract(vals[(treat, "image_auroc")], vals[(base, "image_auroc")]))
      body.append([s, reporting.mean_std(vals[(base, "pixel_ap")]),
                   reporting.mean_std(vals[(treat, "pixel_ap")]), _pp(d),
                   reporting.mean_std(vals[(base, "image_auroc")]),
                   reporting.mean_std(vals[(treat, "image_auroc")]), _pp(di)])
    lines += [f"**{scope}**", ""]
    lines += reporting.table(["step", f"{base} pixel AP", f"{treat} pixel AP", "difference [95 % CI]",
                              f"{base} image AUROC", f"{treat} image AUROC", "difference"], body)
    lines.append("")
  return lines


def selection_table(cfg, results: dict, con: dict) -> list[str]:
  if not con["selected"]:
    return ["No validation split (`data.val_fraction` = 0): no model selection; every number "
            "is at the last step.", ""]
  base, treat = cfg.report.baseline, cfg.report.treatment
  body = []
  for rule, name in (("val", "lowest validation NLL"), ("plateau", "validation plateau")):
    v = view(results, con["selected"][rule])
    for c in list(results) + ["pooled"]:
      scope = list(results) if c == "pooled" else [c]
      steps = {var: [r["step"] for s in scope for r in v[s]["rows"] if r["variant"] == var]
               for var in (base, treat)}
      d = {k: paired(v, base, treat, lambda r, k=k: r["metrics"][k]) for k in METRIC_KEYS}
      cells = [_pp(causal.paired_test(pooled({s: d[k][s] for s in scope}))) for k in METRIC_KEYS]
      body.append([name, c, ", ".join(map(str, steps[base])), ", ".join(map(str, steps[treat])),
                   *cells])
  pr = con["plateau_rows"]
  note = (f"The validation NLL reached a plateau (rule: within {cfg.eval.plateau_tol:g} relative "
          f"of every later budget's best) before the last budget in {pr['before_last']} of "
          f"{pr['rows']} rows" + ("." if pr["before_last"] == pr["rows"] else
                                  "; the others were still improving at the last budget, so a "
                                  "longer ladder could change their selected step."))
  return reporting.table(["rule", "scope", f"{base} steps", f"{treat} steps",
                          *(f"Δ {METRIC_NAMES[k]}" for k in METRIC_KEYS)], body) + ["", note, ""]


def causal_table(cfg, con: dict) -> list[str]:
  L = con["links"]
  lam = cfg.variants[cfg.report.treatment].tail_weight
  rows = []
  if "L1" in L:
    ev = "; ".join(f"{c}: share {v['treatment']['share']:.3f} vs null {v['treatment']['null']:.3f}, "
                   f"excess {reporting.interval(v['treatment']['excess'], signed=True)} "
                   f"(mean-only model: {v['baseline']['share']:.3f} vs {v['baseline']['null']:.3f})"
                   for c, v in L["L1"]["categories"].items())
    rows.append(["L1 concentration", f"tail share of the update (λ = {lam}) − λ + (1−λ)k/N, CI over "
                 "images above 0 in every category", ev, f"**{L['L1']['verdict']}**"])
  else:
    rows.append(["L1 concentration", "needs the analysis (`analysis.enabled`)", "—", "NOT TESTED"])
  if "L2" in L:
    l2 = L["L2"]
    rows.append(["L2 boundary learning", "normal tail gap p99.5 − p50 of held-out normal patch NLL, "
                 "pooled paired Δ below 0",
                 f"Δ gap {reporting.interval(l2['gap'], signed=True)} nats; Δ p99.5 "
                 f"{reporting.interval(l2['p99.5'], signed=True)}; Δ pixel FPR@TPR "
                 f"{cfg.eval.fixed_tpr} {_pp(l2['fpr'])} pp", f"**{l2['verdict']}**"])
  l3 = L["L3"]
  rows.append(["L3 scoring at boundaries", f"pixel AP on the {cfg.eval.boundary_px}-px border band: "
               "pooled paired Δ above 0 and above the interior's",
               f"Δ band AP {_pp(l3['band'])} pp, Δ interior AP {_pp(l3['interior'])} pp",
               f"**{l3['verdict']}**"])
  l4 = L["L4"]
  rows.append(["L4 outcome", "pixel AP, per-category Holm verdicts", f"pooled Δ {_pp(l4['pooled'])} pp, "
               f"reading {l4['reading']}", f"**{l4['verdict']}**"])
  holm = ", ".join(f"{k}: {reporting.pvalue(v)}" for k, v in con["link_holm"].items())
  return reporting.table(["link", "rule (fixed before the run)", "measurement", "verdict"], rows) + [
      "", f"Holm-corrected p-values of the links' tests: {holm}. The budget curve, the hypothesis "
      "table's H3/H7 statistics and the gradient norms are descriptive.", ""] + same_step_table(con)


def same_step_table(con: dict) -> list[str]:
  """L2 and L3 with both models at the same budget (descriptive, pooled paired Δ, 95 % CI)."""
  same = con.get("links_same_step") or {}
  if not same:
    return []
  has_gap = all("gap" in v for v in same.values())
  head = ["step"] + (["Δ normal tail gap (nats)", "Δ p99.5 (nats)"] if has_gap else []) + [
      "Δ band pixel AP (pp)", "Δ interior pixel AP (pp)"]
  body = []
  for s, v in sorted(same.items(), key=lambda kv: int(kv[0])):
    row = [str(s)]
    if has_gap:
      row += [reporting.interval(v["gap"], signed=True), reporting.interval(v["p99.5"], signed=True)]
    body.append(row + [_pp(v["band"]), _pp(v["interior"])])
  return ["Both models at the same step (descriptive; the verdicts above read each row at its "
          "own selected step, which mixes the loss with how long each model trained). Tail − "
          "mean, pooled over categories, 95 % CI over seeds:", ""] + reporting.table(head, body) + [""]


def budget_figure(path: Path, cfg, results: dict, con: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  base, treat = cfg.report.baseline, cfg.report.treatment
  cats = list(results)
  scopes = cats + (["pooled"] if len(cats) > 1 else [])
  steps = con["budgets"]
  x = [max(s, 1) for s in steps]                      # log axis: the untrained flow at 1
  fig, axes = plt.subplots(2, len(scopes), figsize=(3.6 * len(scopes), 6.2), squeeze=False)
  for j, scope in enumerate(scopes):
    ax, dx = axes[0, j], axes[1, j]
    for var, color in ((base, "tab:blue"), (treat, "tab:red")):
      cis = []
      for s in steps:
        v = at_step(results, s)
        per_seed = [np.mean([r["metrics"]["pixel_ap"] for c in (cats if scope == "pooled" else [scope])
                             for r in v[c]["rows"] if r["variant"] == var and r["seed"] == sd])
                    for sd in sorted({r["seed"] for r in v[cats[0]]["rows"]})]
        cis.append(mean_ci(per_seed))
      m = np.array([100 * c["mean"] for c in cis])
      lo = np.array([100 * c["lo"] if np.isfinite(c["lo"]) else 100 * c["mean"] for c in cis])
      hi = np.array([100 * c["hi"] if np.isfinite(c["hi"]) else 100 * c["mean"] for c in cis])
      ax.plot(x, m, "o-", color=color, label=var)
      ax.fill_between(x, lo, hi, color=color, alpha=0.2)
    d = [con["curve"][s]["pooled"] if scope == "pooled" else con["curve"][s]["categories"][scope]
         for s in steps]
    dm = np.array([100 * c["mean"] for c in d])
    dlo = np.array([100 * c["lo"] if np.isfinite(c["lo"]) else 100 * c["mean"] for c in d])
    dhi = np.array([100 * c["hi"] if np.isfinite(c["hi"]) else 100 * c["mean"] for c in d])
    dx.plot(x, dm, "ko-")
    dx.fill_between(x, dlo, dhi, color="k", alpha=0.15)
    dx.axhline(0, color="grey", lw=0.8)
    for a in (ax, dx):
      a.set_xscale("log")
      a.grid(alpha=0.3)
    ax.set_title(scope)
    ax.set_ylabel("pixel AP (%)")
    dx.set_ylabel(f"{treat} − {base} (pp)")
    dx.set_xlabel("training steps (0 plotted at 1)")
    if j == 0:
      ax.legend(fontsize=8)
  fig.suptitle("Pixel AP across the training budget (mean, 95 % CI over seeds)")
  fig.tight_layout()
  reporting.save_figure(fig, path)
