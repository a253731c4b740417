"""Study A's conclusions: every number its report states, computed once from the run's
rows and their per-budget records (``conclusions`` → a typed ``Conclusions``): budget
curve, model selection without the test set, the causal chain, per-category verdicts
with multiplicity correction, the within-category dose–response on the difficulty
ladder (``study_a_ladder``), per defect kind, the answer by regime (a description across
categories), exact vs approximate per-patch NLL, the comparison with other flow
implementations' runs (``study_a_robustness``) and the mechanism analyses' hypothesis
summary. ``study_a_report`` turns them into the
report's sections and writes them. The original study's numbers, shown beside ours,
come from ``original_study.json`` (``ORIGINAL``).

Rules, fixed before any run (they are printed in the report):

* **Primary evaluation point.** Each row is read at the step its *validation* NLL
  selects (lowest mean patch NLL of the held-out normal training images over the
  budget ladder); without a validation split, at the last step. The test set is
  never used to choose anything.
* **Plateau rule** (reported beside it): the earliest budget s whose validation NLL
  (mean per-patch NLL, nats) is within ``eval.plateau_tol`` nats of the best value at any
  later budget: ``v_s − min_{t ≥ s} v_t ≤ tol``. Absolute, so adding the constant
  (C/2)·log 2π (or any constant) to every NLL does not move it. A row *reached the
  plateau* iff that step lies before the last budget. **Convergence sensitivity**: the
  pooled paired pixel-AP difference at the primary point over the (category, seed) pairs
  whose rows in both arms reached the plateau (per seed the mean over its qualifying
  categories, t-interval over seeds); "not estimable" when no pair qualifies.
* **What training does to detection** (descriptive, never used for selection): per
  category and arm, the untrained flow's (step 0) pixel AP as a reference, the best test
  pixel AP over the budgets as a ceiling (it reads the test set), and the Spearman rank
  correlation across budgets of validation NLL and test pixel AP per row (mean over
  seeds; ρ > 0: lower validation NLL goes with worse detection). Training degrades
  detection in a category and arm iff pixel AP at the selected step lies below its
  step-0 value in every seed.
* **Per-category verdicts**: tail − mean per category with an interval and test that
  count the seeds and the test images (``stats.seed_test_interval``: the seed spread and
  a paired bootstrap over the category's test images, ``eval.n_boot`` resamples; a paired
  t-test over seeds alone when the records carry no resamples), Holm-corrected over the
  categories; pooled reading "better"/"worse" when every significant category agrees in
  sign, "mixed" when significant effects of both signs exist. Heterogeneity: Cochran's
  Q / I² from the within-category variance the random-effects estimate uses.
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
* **By regime** (``by_regime``; runs with ≥ 2 categories; a **description**: categories
  and tiers differ in photographs, defect generator, mask rule and strength at once, so
  no reading here is a dose–response — that is the difficulty ladder's,
  ``study_a_ladder``): per category, per tier
  (texture tiers ``hard`` / ``calibrated``; one tier "—" for other data kinds) and
  pooled, the tail − mean pixel AP and image AUROC at the primary point. Pooled two
  ways: the seed-paired estimate (mean over categories per seed, t-interval over seeds)
  and a random-effects estimate across categories (REML τ², HKSJ 95 % CI; τ² and I² shown)
  on per-category (mean difference, seed variance / S + the category's test-image
  bootstrap variance), the seed variance pooled over the scope's categories (a
  category's own variance from 3 seeds is too noisy to weight by:
  ``stats.effects_from_seeds_and_resamples``), with the 95 % prediction interval
  for a new category and the modified-HKSJ interval; "tail-aware better" / "worse"
  iff that CI lies above / below 0. A meta-regression of the per-category effect on the
  mean-only model's image AUROC (its detectability) gives the slope: "the tail-aware
  effect grows with detectability" iff the slope's 95 % CI (HKSJ) lies above 0,
  "shrinks" iff below, else "no dependence on detectability shown". With k < 3
  categories (in the scope) these rows read "not estimable (k < 3)"; they are
  descriptive, outside the Holm families above.
* **Exact vs approximate per-patch NLL** (``nll_comparison``; runs with a variant whose
  ``tail_nll`` is "sq_norm" or "even_share"). Both definitions split the same joint NLL
  over locations two ways (the exact per-location term is one location's share, not a
  patch likelihood). Each tail-aware variant − baseline and each approximate variant −
  the exact treatment, by tier and over all categories. "The original study's gain could
  come from the approximation" iff an approximate variant's pixel-AP difference to the
  baseline (random effects across all categories; seed-paired when not estimable) has
  its CI above 0 while the exact treatment's does not. Approximate − exact pixel AP is
  tested for equivalence (TOST, α = 0.05) against ±``report.equivalence_margin_pp``
  (2 pp), pooled on the per-seed mean over categories and per category: "equivalent
  within ±m pp" iff TOST rejects, "different" iff the 95 % CI excludes 0, else "neither
  shown equivalent nor different". Manipulation check (with the mechanism analyses):
  the Jaccard overlap of the two rankings' top-k sets per validation image; a mean
  overlap ≥ 0.9 in every category reads "this comparison cannot distinguish them".
  Descriptive, outside the Holm families.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from typing import Any, Sequence

import numpy as np
import scipy.stats

from tailjax import metaanalysis, reporting, stats
from tailjax.data import pipeline
from tailjax.evaluation import METRIC_KEYS
from tailjax.studies import study_a_ladder, study_a_robustness
from tailjax.stats import mean_ci


def _original_study() -> dict:
  """``original_study.json``: the original study's numbers (study note 004)."""
  text = importlib.resources.files("tailjax.studies").joinpath("original_study.json").read_text()
  return json.loads(text)


ORIGINAL = _original_study()
HYPOTHESES = ("H1", "H3", "H4", "H7")


def rules_bullets() -> list[str]:
  """The rules of this module's and ``study_a_ladder``'s docstrings as markdown bullets
  (one source for code and report)."""
  out = []
  for doc in (__doc__, study_a_ladder.__doc__):
    text = doc.split("printed in the report):", 1)[1].split("\n\n")
    text = "\n\n".join(p for p in text if p.lstrip().startswith("*") or p.startswith("  "))
    items = [" ".join(part.split()) for part in text.split("\n* ") if part.strip()]
    out += [f"- {(item[2:] if item.startswith('* ') else item).replace('``', '`')}"
            for item in items]
  return out


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
  validation NLL alone; None without a validation split. ``tol``: the plateau rule's
  tolerance in nats per patch (absolute, see the module docstring)."""
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
      ok = np.where(v - later_best <= tol)[0]
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


def paired_resamples(results_view: dict, base: str, treat: str, metric: str
                     ) -> dict[str, np.ndarray] | None:
  """Per category: treat − base per seed on every bootstrap resample of the test images
  ``[S, R]`` (``record["boot"]``, the same resamples for every row: ``evaluation``), or
  None when the records carry no resamples (``eval.n_boot`` = 0)."""
  out = {}
  for c, res in results_view.items():
    by = {(r["variant"], r["seed"]): r.get("record", {}).get("boot") for r in res["rows"]}
    if any(b is None for b in by.values()):
      return None
    seeds = sorted(s for v, s in by if v == base)
    out[c] = np.array([np.subtract(by[(treat, s)][metric], by[(base, s)][metric])
                       for s in seeds], np.float64)
  return out


def pooled(per_cat: dict[str, np.ndarray]) -> np.ndarray:
  """Per seed, the mean over categories (categories where a value is undefined drop out)."""
  stacked = np.stack(list(per_cat.values()))
  ok = np.isfinite(stacked)
  total = np.where(ok, stacked, 0.0).sum(0)
  count = ok.sum(0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def summarize(results: dict[str, dict], baseline: str, treatment: str) -> dict:
  """The last step's table: per category and over categories, mean ± CI per variant of
  every metric (``values``: per seed), the paired treatment − baseline CI, and PaDiM."""
  cats = list(results)
  variants = list(dict.fromkeys(r["variant"] for r in results[cats[0]]["rows"]))
  per_seed: dict[str, dict[str, dict[int, dict]]] = {}
  for c in cats:
    for r in results[c]["rows"]:
      per_seed.setdefault(r["variant"], {}).setdefault(c, {})[r["seed"]] = r["metrics"]
  out: dict[str, Any] = {"variants": variants, "categories": {}, "mean": {}}
  seeds = sorted(per_seed[variants[0]][cats[0]])
  for scope in cats + ["mean"]:
    table = {}
    for v in variants:
      table[v] = {}
      for k in METRIC_KEYS:
        vals = ([per_seed[v][scope][s][k] for s in seeds] if scope != "mean" else
                [np.mean([per_seed[v][c][s][k] for c in cats]) for s in seeds])
        table[v][k] = mean_ci(vals) | {"values": [float(x) for x in vals]}
    if baseline in table and treatment in table:
      diffs = {k: np.subtract(table[treatment][k]["values"], table[baseline][k]["values"])
               for k in METRIC_KEYS}
      table["difference"] = {k: mean_ci(d) | {"values": d.tolist()} for k, d in diffs.items()}
    table["padim"] = ({k: float(results[scope]["padim"][k]) for k in METRIC_KEYS} if scope != "mean"
                      else {k: float(np.mean([results[c]["padim"][k] for c in cats]))
                            for k in METRIC_KEYS})
    if scope == "mean":
      out["mean"] = table
    else:
      out["categories"][scope] = table
  out["seeds"] = seeds
  return out


# ----------------------------------------------------------------------------
# Conclusions: every number the report states, as typed records
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
  """A row family of the run: λ, r and the per-patch NLL its tail is ranked by."""
  name: str
  tail_weight: float
  top_k_ratio: float
  tail_nll: str


@dataclasses.dataclass(frozen=True)
class Setup:
  """What ran: the config values and run facts the report's setup paragraph states
  (config values as the config holds them, so they print as written)."""
  data_kind: str
  features: str                    # ``pipeline.describe_features``
  grid: tuple[int, int]            # patches of the feature grid
  n_val: int                       # normal training images held out per category
  coupling_steps: int
  kernel_mode: str
  layer_norm: Any
  train_steps: int
  batch_size: int
  optimizer: str
  learning_rate: float
  seeds: tuple[int, ...]
  variants: tuple[Variant, ...]
  score: str
  size: int
  smoothing_sigma: float
  image_score: str
  plateau_tol: float
  boundary_px: int
  fixed_tpr: float
  seconds: float                   # training and evaluation, the last `tailjax train`
  extended: tuple[dict, ...]       # the manifest's ``extended`` records
  examples: tuple[str, ...]        # categories with an ``examples.png``

  def variant(self, name: str) -> Variant:
    return next(v for v in self.variants if v.name == name)

  def to_json(self) -> dict:
    """JSON-ready, without ``seconds``: ``conclusions.json`` holds no wall time, so two
    runs of one config compare byte for byte."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "seconds"}


@dataclasses.dataclass(frozen=True)
class Conclusions:
  """Everything study A's report states, computed once by ``conclusions``.

  Statistics are the JSON-ready dicts of ``tailjax.stats``, ``tailjax.analysis.causal`` and
  ``metaanalysis`` (intervals with ``mean``/``lo``/``hi``/``p``); fields that do not
  apply to a run are None (``plateau_rows`` without a validation split, ``by_regime``
  for one category, ``tail_nll`` without an approximate variant, ``mechanisms``
  without the analyses).
  """
  setup: Setup
  baseline: str
  treatment: str
  categories: tuple[str, ...]
  primary: str                     # "val" (validation-selected step) or "final"
  budgets: tuple[int, ...]
  selected: dict                   # {rule: {category: step per row}} ({} without val)
  plateau_rows: dict | None
  verdicts: dict                   # {metric: stats.category_verdicts}
  pooled_diff: dict                # {metric: paired test of the pooled difference}
  curve: dict                      # {step: {"pooled", "categories"}}
  budget_sign: dict
  links: dict                      # the causal chain L1–L4
  links_same_step: dict            # {step: L2/L3 with both models at that step}
  link_holm: dict
  n_seeds: int
  by_regime: dict | None
  tail_nll: dict | None
  final: dict                      # ``summarize``: the last step's table
  budget_table: dict               # {scope: {step: per-seed values, Δ image AUROC}}
  selection: dict                  # {rule: {scope: steps and paired differences}}
  convergence: dict                # {category: {variant: step 0, selected, ceiling, ρ}}
  mechanisms: dict | None          # ``hypothesis_summary`` of the mechanism analyses
  ladder: dict | None = None       # ``study_a_ladder.ladder_conclusions`` (the dose–response)
  by_kind: dict | None = None      # per defect kind at the primary point (``defect_kinds``)
  robustness: dict | None = None   # ``study_a_robustness.compare`` (``report.compare_runs``)

  def to_json(self) -> dict:
    """JSON-ready (``io.to_json``); fields that do not apply are left out."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if getattr(self, f.name) is not None}
    out["setup"] = self.setup.to_json()
    return out


def conclusions(cfg, results: dict, analysis: dict | None = None, *,
                summary: dict | None = None, seconds: float = 0.0,
                extended: Sequence[dict] = (), examples: Sequence[str] = ()) -> Conclusions:
  """Everything the report states, from the rows' per-budget records (``results``: per
  category, ``rows`` and ``budgets``; ``grid``, ``n_val`` and ``padim`` as study A
  writes them) and, when given, the mechanism analyses (``mechanisms.analyze_run``).

  ``summary``: ``summarize(results, ...)`` when the caller has it (computed here
  otherwise); ``seconds``, ``extended``, ``examples``: the run facts of ``Setup``.
  """
  base, treat = cfg.report.baseline, cfg.report.treatment
  steps = budgets(results)
  cats = list(results)
  sel = {rule: {c: selected_steps(results, c, rule, float(cfg.eval.plateau_tol)) for c in cats}
         for rule in ("val", "plateau")}
  has_val = all(v is not None for v in sel["val"].values())
  primary = view(results, sel["val"] if has_val else
                 {c: [steps[-1]] * len(results[c]["rows"]) for c in cats})
  verdicts, pooled_diff = _primary_tests(primary, base, treat)
  curve = _budget_curve(results, steps, base, treat)
  links = _causal_links(primary, base, treat, has_val, analysis, verdicts["pixel_ap"],
                        pooled_diff["pixel_ap"])
  n_seeds = len({r["seed"] for r in next(iter(results.values()))["rows"]})
  summary = summary if summary is not None else summarize(results, base, treat)
  convergence = _convergence(results, primary, steps, has_val)
  own = {k: verdicts[k]["categories"] for k in study_a_robustness.METRICS}
  own["levels"] = study_a_robustness.levels(convergence, base, treat)
  return Conclusions(
      setup=_setup(cfg, results, summary, seconds, extended, examples),
      baseline=base, treatment=treat, categories=tuple(cats),
      primary="val" if has_val else "final", budgets=tuple(steps),
      selected={r: v for r, v in sel.items() if has_val},
      plateau_rows=(_plateau_rows(sel["plateau"], steps, primary, base, treat) if has_val
                    else None),
      verdicts=verdicts, pooled_diff=pooled_diff, curve=curve,
      budget_sign=_budget_sign(curve, steps), links=links,
      links_same_step=_same_step_links(results, steps, base, treat, has_val),
      link_holm=_link_holm(links), n_seeds=n_seeds,
      by_regime=by_regime(cfg, primary) if len(cats) >= 2 else None,
      tail_nll=nll_comparison(cfg, primary, analysis), final=summary,
      budget_table=_budget_table(results, steps, base, treat, curve),
      selection=_selection(results, sel, base, treat) if has_val else {},
      convergence=convergence,
      mechanisms=hypothesis_summary(analysis) if analysis is not None else None,
      ladder=study_a_ladder.ladder_conclusions(cfg, results, base, treat),
      by_kind=defect_kinds(primary, base, treat),
      robustness=study_a_robustness.compare(cfg, "this run", own,
                                            study_a_robustness.compare_runs(cfg)))


def defect_kinds(primary: dict, base: str, treat: str) -> dict | None:
  """Per defect kind (``record["by_kind"]``: each kind's defective images with every good
  image of its category), pooled over the categories that have it: both arms' mean over
  seeds and categories, and treat − base per seed (mean over those categories) with its
  t-interval over seeds, for pixel AP and image AUROC. None without per-kind records."""
  rows = [r for res in primary.values() for r in res["rows"]]
  if not rows or any("by_kind" not in r.get("record", {}) for r in rows):
    return None
  kinds = sorted({k for r in rows for k in r["record"]["by_kind"]})
  out = {}
  for kind in kinds:
    cats = [c for c, res in primary.items() if kind in res["rows"][0]["record"]["by_kind"]]
    sub = {c: primary[c] for c in cats}
    cell = {"categories": cats,
            "n": int(sum(sub[c]["rows"][0]["record"]["by_kind"][kind]["n"] for c in cats))}
    for k in REGIME_METRICS:
      value = lambda r, k=k: r["record"]["by_kind"][kind][k]
      arm = lambda v: float(np.mean([value(r) for c in cats for r in sub[c]["rows"]
                                     if r["variant"] == v]))
      cell[k] = {"base": arm(base), "treat": arm(treat),
                 "delta": stats.paired_test(pooled(paired(sub, base, treat, value)))}
    out[kind] = cell
  return out


def _setup(cfg, results: dict, summary: dict, seconds: float, extended: Sequence[dict],
           examples: Sequence[str]) -> Setup:
  first = next(iter(results.values()))
  variants = tuple(Variant(n, v.tail_weight, v.top_k_ratio, v.get("tail_nll", "exact"))
                   for n, v in cfg.variants.items())
  e = cfg.eval
  return Setup(
      data_kind=cfg.data.kind, features=pipeline.describe_features(cfg),
      grid=tuple(first["grid"]), n_val=first.get("n_val", 0),
      coupling_steps=cfg.flow.num_steps, kernel_mode=cfg.flow.kernel_mode,
      layer_norm=cfg.flow.layer_norm, train_steps=cfg.train.num_steps,
      batch_size=cfg.train.batch_size, optimizer=cfg.optim.name,
      learning_rate=cfg.optim.learning_rate, seeds=tuple(summary["seeds"]), variants=variants,
      score=e.score, size=e.size, smoothing_sigma=e.smoothing_sigma, image_score=e.image_score,
      plateau_tol=e.plateau_tol, boundary_px=e.boundary_px, fixed_tpr=e.fixed_tpr,
      seconds=float(seconds), extended=tuple(extended), examples=tuple(examples))


def _plateau_rows(plateau: dict[str, list[int]], steps: list[int], primary: dict, base: str,
                  treat: str) -> dict:
  """How many rows' validation NLL reached its plateau before the last budget (overall
  and per category), the seeds per category whose rows in both arms reached it, and the
  convergence sensitivity: the pooled paired pixel-AP difference at the primary point over
  those (category, seed) pairs (per seed the mean over its qualifying categories)."""
  reached = {c: [s < steps[-1] for s in plateau[c]] for c in plateau}
  both, restricted = {}, {}
  for c, d in paired(primary, base, treat, lambda r: r["metrics"]["pixel_ap"]).items():
    by = {(r["variant"], r["seed"]): ok for r, ok in zip(primary[c]["rows"], reached[c])}
    seeds = sorted(sd for v, sd in by if v == base)        # ``paired``'s seed order
    both[c] = [sd for sd in seeds if by[(base, sd)] and by[(treat, sd)]]
    restricted[c] = np.where(np.isin(seeds, both[c]), d, np.nan)
  n_pairs = sum(len(v) for v in both.values())
  sensitivity = ({"estimable": True, "pairs": n_pairs,
                  "pixel_ap": stats.paired_test(pooled(restricted))} if n_pairs else
                 {"estimable": False, "pairs": 0, "reason": "not estimable (no category and "
                  "seed where both arms reached the plateau)"})
  flat = [x for c in reached for x in reached[c]]
  return {"before_last": int(sum(flat)), "rows": len(flat),
          "categories": {c: {"before_last": int(sum(v)), "rows": len(v)}
                         for c, v in reached.items()},
          "both_arms": both, "sensitivity": sensitivity}


def _spearman(x, y) -> float:
  """Spearman's ρ of two curves; NaN when either is flat (no rank order to correlate)."""
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(x, y).statistic)


def _convergence(results: dict, primary: dict, steps: list[int], has_val: bool) -> dict:
  """What training does to detection, per category and variant (descriptive; never used
  for selection). Per seed: pixel AP at the selected step (``primary``), at step 0 (the
  untrained flow; when 0 is a budget) and its best over the budgets (the ceiling: reads
  the test set), and Spearman's ρ across budgets of validation NLL and test pixel AP (with
  a validation split). ``degrades``: selected-step pixel AP below step 0 in every seed;
  ``change``: selected − step 0, mean over seeds."""
  out = {}
  for c, res in results.items():
    out[c] = {}
    for var in dict.fromkeys(r["variant"] for r in res["rows"]):
      idx = [i for i, r in enumerate(res["rows"]) if r["variant"] == var]
      ap_RxS = np.array([[_record(results, c, s, i)["metrics"]["pixel_ap"] for s in steps]
                         for i in idx])
      sel_R = np.array([primary[c]["rows"][i]["metrics"]["pixel_ap"] for i in idx])
      cell = {"seeds": [res["rows"][i]["seed"] for i in idx],
              "selected_steps": [primary[c]["rows"][i]["step"] for i in idx],
              "selected": sel_R.tolist(), "ceiling": ap_RxS.max(1).tolist(),
              "ceiling_steps": [steps[j] for j in ap_RxS.argmax(1)]}
      if 0 in steps:
        step0_R = ap_RxS[:, steps.index(0)]
        cell |= {"step0": step0_R.tolist(), "degrades": bool(np.all(sel_R < step0_R)),
                 "change": float(np.mean(sel_R - step0_R))}
      if has_val:
        rho = [_spearman([_record(results, c, s, i)["val"]["mean"] for s in steps], ap_S)
               for i, ap_S in zip(idx, ap_RxS)]
        cell |= {"spearman": rho,
                 "spearman_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else
                 float("nan")}
      out[c][var] = cell
  return out


def _primary_tests(primary: dict, base: str, treat: str) -> tuple[dict, dict]:
  """Per-category verdicts (pixel AP, image AUROC; with the test images counted when the
  records carry resamples) and the pooled paired difference of every metric, at the
  primary point (``with_test``: the interval that also counts the test images)."""
  metric = lambda k: (lambda r: r["metrics"][k])
  verdicts = {k: stats.category_verdicts(paired(primary, base, treat, metric(k)),
                                         replicates=paired_resamples(primary, base, treat, k))
              for k in ("pixel_ap", "image_auroc")}
  pooled_diff = {}
  for k in METRIC_KEYS:
    d = paired(primary, base, treat, metric(k))
    pooled_diff[k] = stats.paired_test(pooled(d))
    reps = paired_resamples(primary, base, treat, k) if k in REGIME_METRICS else None
    if reps is not None:
      # Categories' resamples are independent, so resample r of the mean over categories
      # is the mean of their resamples r: the pooled difference's test-image noise.
      pooled_diff[k]["with_test"] = stats.seed_test_test(
          pooled(d), np.mean(np.stack(list(reps.values())), 0))
  return verdicts, pooled_diff


def _budget_curve(results: dict, steps: list[int], base: str, treat: str) -> dict:
  """Pixel AP tail − mean at every budget: pooled over categories and per category."""
  ap = lambda r: r["metrics"]["pixel_ap"]
  curve = {}
  for s in steps:
    v = at_step(results, s)
    curve[s] = {"pooled": stats.paired_test(pooled(paired(v, base, treat, ap))),
                "categories": {c: stats.paired_test(d)
                               for c, d in paired(v, base, treat, ap).items()}}
  return curve


def _budget_sign(curve: dict, steps: list[int]) -> dict:
  """Does the pooled difference change sign across the trained budgets (s > 0)?"""
  trained = [s for s in steps if s > 0]
  signs = {s: np.sign(curve[s]["pooled"]["mean"]) for s in trained}
  return {"depends": len({x for x in signs.values() if x != 0}) > 1,
          "significant": {s: reporting.side_of_zero(curve[s]["pooled"]) for s in trained
                          if reporting.side_of_zero(curve[s]["pooled"]) != 0},
          "signs": {s: int(x) for s, x in signs.items()}}


def _causal_links(primary: dict, base: str, treat: str, has_val: bool, analysis: dict | None,
                  verdict_ap: dict, pooled_ap: dict) -> dict:
  """L2 and L3 from the evaluation records, L1 from the analyses, L4 from the verdicts."""
  links = {}
  if has_val:
    links["L2"] = _l2(primary, base, treat)
  links["L3"] = _l3(primary, base, treat)
  l1 = _l1(analysis)
  if l1 is not None:
    links["L1"] = l1
  links["L4"] = {"pooled": pooled_ap.get("with_test", pooled_ap), "reading": verdict_ap["pooled"],
                 "verdict": {"better": "SUPPORTED", "worse": "CONTRADICTED",
                             "mixed": "MIXED"}.get(verdict_ap["pooled"], "NOT SUPPORTED")}
  return links


def _l2(primary: dict, base: str, treat: str) -> dict:
  """L2: the normal tail gap (and p99.5, pixel FPR@TPR) of held-out normal patch NLL."""
  gap = paired(primary, base, treat, lambda r: r["record"]["val"]["gap"])
  p995 = paired(primary, base, treat, lambda r: r["record"]["val"]["p99.5"])
  fpr = paired(primary, base, treat, lambda r: r["record"]["boundary"]["all"]["fpr_at_tpr"])
  l2 = {"gap": stats.paired_test(pooled(gap)), "p99.5": stats.paired_test(pooled(p995)),
        "fpr": stats.paired_test(pooled(fpr)),
        "categories": {c: stats.paired_test(d) for c, d in gap.items()}}
  l2["verdict"] = "SUPPORTED" if reporting.side_of_zero(l2["gap"]) < 0 else "NOT SUPPORTED"
  return l2


def _l3(primary: dict, base: str, treat: str) -> dict:
  """L3: pixel AP on the defect border band against the interior."""
  band = pooled(paired(primary, base, treat, lambda r: r["record"]["boundary"]["band"]["ap"]))
  inner = pooled(paired(primary, base, treat,
                        lambda r: r["record"]["boundary"]["interior"]["ap"]))
  l3 = {"band": stats.paired_test(band), "interior": stats.paired_test(inner),
        "band_minus_interior": stats.paired_test(band - inner)}
  up = reporting.side_of_zero(l3["band"]) > 0
  l3["verdict"] = ("SUPPORTED" if up and l3["band"]["mean"] > l3["interior"]["mean"] else
                   "PARTIAL" if up else "NOT SUPPORTED")
  return l3


def _l1(analysis: dict | None) -> dict | None:
  """L1 from the analyses' per-category excess share, or None without them."""
  if analysis is None:
    return None
  l1 = {c: a["l1"] for c, a in analysis["categories"].items() if "l1" in a}
  if not l1:
    return None
  beyond = all(v["treatment"]["beyond"] for v in l1.values())
  return {"categories": l1, "verdict": "BEYOND CONSTRUCTION" if beyond else "BY CONSTRUCTION"}


def _link_holm(links: dict) -> dict:
  """Holm-corrected p-values over the links' pooled tests (L1: one per category)."""
  names, ps = [], []
  for name, key in (("L2", "gap"), ("L3", "band"), ("L4", "pooled")):
    if name in links:
      names.append(name)
      ps.append(links[name][key]["p"])
  if "L1" in links:
    for c, v in links["L1"]["categories"].items():
      names.append(f"L1 {c}")
      ps.append(v["treatment"]["excess"]["p"])
  return dict(zip(names, (float(x) for x in stats.holm(ps))))


def _same_step_links(results: dict, steps: list[int], base: str, treat: str,
                     has_val: bool) -> dict:
  """L2 and L3 with both models read at the same step (descriptive): the primary point
  compares each row at its own selected step, which mixes the loss with training length."""
  same_step = {}
  for s in (s for s in steps if s > 0):
    v = at_step(results, s)
    d = lambda f: stats.paired_test(pooled(paired(v, base, treat, f)))
    same_step[s] = {"band": d(lambda r: r["record"]["boundary"]["band"]["ap"]),
                    "interior": d(lambda r: r["record"]["boundary"]["interior"]["ap"])}
    if has_val:
      same_step[s]["gap"] = d(lambda r: r["record"]["val"]["gap"])
      same_step[s]["p99.5"] = d(lambda r: r["record"]["val"]["p99.5"])
  return same_step


def _budget_table(results: dict, steps: list[int], base: str, treat: str, curve: dict) -> dict:
  """Per scope (each category, and "pooled" over several) and budget: the per-seed pixel
  AP and image AUROC of both variants (mean over the scope's categories per seed), the
  pixel-AP difference (``curve``) and the paired image-AUROC difference."""
  cats = list(results)
  seeds = sorted({r["seed"] for r in results[cats[0]]["rows"]})
  out = {}
  for scope in cats + (["pooled"] if len(cats) > 1 else []):
    members = cats if scope == "pooled" else [scope]
    out[scope] = {}
    for s in steps:
      v = at_step(results, s)
      vals = {var: {k: [np.mean([r["metrics"][k] for c in members for r in v[c]["rows"]
                                 if r["variant"] == var and r["seed"] == sd])
                        for sd in seeds]
                    for k in ("pixel_ap", "image_auroc")}
              for var in (base, treat)}
      di = stats.paired_test(np.subtract(vals[treat]["image_auroc"], vals[base]["image_auroc"]))
      d = curve[s]["pooled"] if scope == "pooled" else curve[s]["categories"][scope]
      out[scope][s] = {"values": vals, "pixel_ap_diff": d, "image_auroc_diff": di}
  return out


SELECTION_RULES = (("val", "lowest validation NLL"), ("plateau", "validation plateau"))


def _selection(results: dict, sel: dict, base: str, treat: str) -> dict:
  """Per selection rule and scope (each category, "pooled"): the selected steps of both
  variants and the pooled paired differences of every metric at those steps."""
  cats = list(results)
  out = {}
  for rule, _ in SELECTION_RULES:
    v = view(results, sel[rule])
    d = {k: paired(v, base, treat, lambda r, k=k: r["metrics"][k]) for k in METRIC_KEYS}
    out[rule] = {}
    for c in cats + ["pooled"]:
      scope = cats if c == "pooled" else [c]
      out[rule][c] = {
          "steps": {var: [r["step"] for s in scope for r in v[s]["rows"] if r["variant"] == var]
                    for var in (base, treat)},
          "diff": {k: stats.paired_test(pooled({s: d[k][s] for s in scope}))
                   for k in METRIC_KEYS}}
  return out


def hypothesis_summary(analysis: dict) -> dict:
  """The hypothesis table's rows: claim, our verdict over categories, per-category
  evidence and the original study's verdict."""
  rows = []
  for h in HYPOTHESES:
    ev = "; ".join(f"{c}: {r[h.lower()]['verdict']} — {r[h.lower()]['evidence']}"
                   for c, r in analysis["categories"].items())
    rows.append({"hypothesis": h, "claim": ORIGINAL["claims"][h],
                 "verdict": analysis["overall"][h], "evidence": ev,
                 "original_verdict": ORIGINAL["hypotheses"][h]["verdict"]})
  return {"rows": rows}


def hypothesis_table(summary: dict) -> list[str]:
  """hypothesis | claim | verdict (ours) | key evidence | the original study's verdict."""
  return reporting.table(
      ["hypothesis", "claim", "verdict (ours)", "key evidence", "original study's verdict"],
      [[f"**{r['hypothesis']}**", r["claim"], f"**{r['verdict']}**", r["evidence"],
        r["original_verdict"]] for r in summary["rows"]])


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


def _meta_inputs(diffs: dict[str, np.ndarray], reps: dict[str, np.ndarray] | None = None):
  """(y_K, v_K) = ``metaanalysis.effects_from_seeds`` (seed variance pooled over the
  categories) of the finite per-seed differences, or with test-image resamples ``reps``
  (per category ``[S, R]``) ``effects_from_seeds_and_resamples`` (seed part pooled, each
  category's test-image part added); or the reason why not (k < 3, a category with < 2
  seeds, no variance at all)."""
  if len(diffs) < MIN_META_K:
    return _not_estimable(f"k < {MIN_META_K}")
  rows = {c: d[np.isfinite(d)] for c, d in diffs.items()}
  few = [c for c, d in rows.items() if d.size < 2]
  if few:
    return _not_estimable(f"< 2 seeds in {', '.join(few)}")
  if reps is not None and all(np.isfinite(d).all() for d in diffs.values()):
    y_K, v_K = stats.effects_from_seeds_and_resamples(
        list(rows.values()), [reps[c] for c in rows], pool_variance=True)
  else:
    y_K, v_K = metaanalysis.effects_from_seeds(list(rows.values()), pool_variance=True)
  if not (v_K > 0).all():
    return _not_estimable("zero seed variance in every category")
  return y_K, v_K


def _ci(mean, se, ci, p) -> dict:
  return {"mean": float(mean), "se": float(se), "lo": float(ci[0]), "hi": float(ci[1]),
          "p": float(p)}


def regime_random_effects(diffs: dict[str, np.ndarray],
                          reps: dict[str, np.ndarray] | None = None) -> dict:
  """Random-effects pooled tail − mean over the categories of ``diffs`` (per category,
  per-seed differences): ``metaanalysis.random_effects`` (REML, HKSJ) on
  ``y_i = mean_s d_is``, ``v_i`` = the pooled seed variance / S plus, with ``reps``, the
  category's test-image variance (``_meta_inputs``), and its verdict (CI vs 0). Also the
  95 % prediction interval for a new category's effect and the modified-HKSJ interval
  (a sensitivity when k ≤ 4); Q and I² come from the same v_i as the estimate."""
  inputs = _meta_inputs(diffs, reps)
  if isinstance(inputs, dict):
    return inputs
  re = metaanalysis.random_effects(*inputs, method="reml", ci="hksj")
  out = {"estimable": True, **_ci(re.mu, re.se, re.ci, re.p_value), "tau2": re.tau2,
         "tau2_lo": re.tau2_ci[0], "tau2_hi": re.tau2_ci[1], "i2": re.i2, "q": re.q,
         "q_df": re.q_df, "q_p": re.q_p_value, "k": re.k, "method": re.method,
         "ci_method": re.ci_method, "pi_lo": re.pi[0], "pi_hi": re.pi[1], "pi_df": re.pi_df,
         "ci_modified": [float(v) for v in re.ci_modified],
         "test_images": reps is not None}
  out["verdict"] = reporting.difference_verdict(out, "tail-aware better", "tail-aware worse")
  return out


def regime_meta_regression(diffs: dict[str, np.ndarray], x: dict[str, float],
                           reps: dict[str, np.ndarray] | None = None) -> dict:
  """Random-effects meta-regression ``y_i = a + b · x_i`` of the per-category tail − mean
  on ``x`` (the mean-only model's image AUROC): ``metaanalysis.meta_regression`` (REML,
  HKSJ on k − 2 df). ``b`` is in effect units per covariate unit (pp per pp). Verdict:
  "grows" iff b's CI lies above 0, "shrinks" iff below, else no dependence shown."""
  inputs = _meta_inputs(diffs, reps)
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
  image AUROC, its ``stats.paired_test`` and the covariate ``x_c`` = the mean over
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
  reps = {k: paired_resamples(primary, base, treat, k) for k in REGIME_METRICS}
  sub = lambda r, members: None if r is None else {c: r[c] for c in members}
  x = {c: float(np.mean([r["metrics"]["image_auroc"] for r in primary[c]["rows"]
                         if r["variant"] == base])) for c in cats}

  def category(c):
    out = {"tier": tier[c], "covariate": x[c]}
    for k in REGIME_METRICS:
      out[k] = stats.paired_test(diffs[k][c])
      if reps[k] is not None:   # the interval that counts the test images too
        out[k]["with_test"] = stats.seed_test_interval(diffs[k][c], reps[k][c],
                                                       bounds=stats.AUC_DIFF_BOUNDS)
    return out

  out = {"covariate": f"image AUROC of the {base} rows at their selected step, mean over seeds",
         "test_images": reps["pixel_ap"] is not None,
         "categories": {c: category(c) for c in cats}, "tiers": {}, "pooled": {}}
  for t in dict.fromkeys(tier.values()):
    members = [c for c in cats if tier[c] == t]
    out["tiers"][t] = {"categories": members}
    for k in REGIME_METRICS:
      d = {c: diffs[k][c] for c in members}
      out["tiers"][t][k] = {"seed_paired": stats.paired_test(pooled(d)),
                            "random_effects": regime_random_effects(d, sub(reps[k], members))}
  for k in REGIME_METRICS:
    out["pooled"][k] = {"seed_paired": stats.paired_test(pooled(diffs[k])),
                        "random_effects": regime_random_effects(diffs[k], reps[k]),
                        "meta_regression": regime_meta_regression(diffs[k], x, reps[k])}
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


# The equivalence margin of exact vs approximate per-patch NLL when a config has no
# ``report.equivalence_margin_pp`` (configs other than fastflow_textures).
EQUIVALENCE_MARGIN_PP = 2.0
# Mean top-k overlap (Jaccard) of the exact and even-share rankings at or above which the
# two definitions pick nearly the same patches, so their results cannot tell them apart.
OVERLAP_SAME = 0.9


def equivalence_margin_pp(cfg) -> float:
  """``report.equivalence_margin_pp`` (> 0), or ``EQUIVALENCE_MARGIN_PP`` without it."""
  rep = cfg.get("report", {}) if hasattr(cfg, "get") else {}
  m = float(rep.get("equivalence_margin_pp", EQUIVALENCE_MARGIN_PP))
  if not m > 0:
    raise ValueError(f"config.report.equivalence_margin_pp must be > 0, got {m}")
  return m


def equivalence(diffs_pp, margin_pp: float) -> dict:
  """TOST (``metaanalysis.tost_paired``, α = 0.05, so a 90 % interval) of paired per-seed
  differences in pp against ±``margin_pp``, beside the 95 % t-interval
  (``stats.paired_test``). Verdict: "equivalent within ±m pp" iff TOST rejects
  non-equivalence; else "different" iff the 95 % CI excludes 0; else "neither shown
  equivalent nor different"; "undetermined (< 2 seeds)" without two finite differences."""
  d = np.asarray(diffs_pp, np.float64).ravel()
  d = d[np.isfinite(d)]
  test = stats.paired_test(d)
  if d.size < 2:
    return {**test, "margin": margin_pp, "verdict": "undetermined (< 2 seeds)"}
  eq = metaanalysis.tost_paired(d, margin_pp)
  out = {**test, "margin": margin_pp, "tost_p": eq.p, "ci90_lo": eq.ci90[0],
         "ci90_hi": eq.ci90[1], "equivalent": bool(eq.equivalent)}
  side = reporting.side_of_zero(test)
  if eq.equivalent:
    out["verdict"] = f"equivalent within ±{margin_pp:g} pp"
  elif side:
    out["verdict"] = "different"
  else:
    out["verdict"] = "neither shown equivalent nor different"
  return out


def _overlap(analysis: dict | None, names: Sequence[str]) -> dict | None:
  """Per category, the validation-image overlap summaries of ``names`` from the mechanism
  analyses' "nll_overlap" (``mechanisms.nll_overlap``), and the reading by
  ``OVERLAP_SAME`` on the smallest per-category mean; None without the analyses."""
  cats = (analysis or {}).get("categories", {})
  per = {c: {n: a["nll_overlap"][n]["val"] for n in names
             if n in a.get("nll_overlap", {}) and a["nll_overlap"][n]["val"].get("n_images")}
         for c, a in cats.items()}
  per = {c: v for c, v in per.items() if v}
  if not per:
    return None
  low = min(s["mean"]["mean"] for v in per.values() for s in v.values())
  reading = (f"the two definitions pick nearly the same patches (mean overlap ≥ {OVERLAP_SAME:g} "
             "in every category): this comparison cannot distinguish them — a difference in "
             "results comes from the tail's average, not from which patches are chosen"
             if low >= OVERLAP_SAME
             else f"the two definitions pick different patches (mean overlap < {OVERLAP_SAME:g} "
             "in some category)")
  return {"categories": per, "min_mean": low, "reading": reading}


def nll_comparison(cfg, primary: dict, analysis: dict | None = None) -> dict | None:
  """Exact vs approximate per-patch NLL in the tail (``losses.NLL_DEFINITIONS``), or None
  when the run has no approximate variant or no exact treatment.

  Both definitions split one joint NLL over locations (with 3×3 couplings and image-level
  LayerNorm a location's term depends on its neighbours): neither is a patch likelihood.

  For every tail-aware variant V (the treatment, exact, and each approximate one A):
  V − baseline per scope (tier, all) and metric, seed-paired and random effects (as
  ``by_regime``); for each A also A − treatment (the approximation's own effect), its
  reading (better / worse / no difference shown, CI vs 0) and the equivalence test of
  A − treatment pixel AP (``equivalence``, margin ``equivalence_margin_pp`` fixed before
  the run): pooled on the per-seed mean over categories, and per category.
  Verdict, fixed before the run, on pixel AP across all categories by random effects
  (seed-paired when random effects is not estimable): "the original study's gain could
  come from the approximation" iff some A − baseline CI lies above 0 while the exact treatment's
  does not; "the approximation gains, and so does the exact loss" iff both lie above 0;
  otherwise "the approximation does not produce a gain here". With the mechanism
  analyses (``analysis``): the manipulation check, the top-k overlap of the two
  rankings per category (``_overlap``).
  """
  if "variants" not in cfg:
    return None
  defs = tail_nll_variants(cfg)
  treat = cfg.report.treatment
  approx = [n for n, d in defs.items() if d != "exact"]
  if not approx or defs.get(treat) != "exact":
    return None
  base = cfg.report.baseline
  margin = equivalence_margin_pp(cfg)
  out: dict[str, Any] = {"baseline": base, "exact": treat, "definitions": defs, "variants": {},
                         "equivalence_margin_pp": margin,
                         "overlap": _overlap(analysis, [treat, *approx])}

  gains = {}
  for name in [treat, *approx]:
    br = by_regime(cfg, primary, base=base, treat=name)
    rec = {"tail_nll": defs[name],
           "vs_baseline": {k: _scopes(br, k) for k in REGIME_METRICS}}
    gains[name] = reporting.side_of_zero(headline(rec["vs_baseline"]["pixel_ap"])) > 0
    if name != treat:
      bx = by_regime(cfg, primary, base=treat, treat=name)
      rec["vs_exact"] = {k: _scopes(bx, k) for k in REGIME_METRICS}
      side = reporting.side_of_zero(headline(rec["vs_exact"]["pixel_ap"]))
      rec["vs_exact_reading"] = {1: "better than exact", -1: "worse than exact"}.get(
          side, "no difference from exact shown")
      d_pp = paired(primary, treat, name, lambda r: 100.0 * r["metrics"]["pixel_ap"])
      rec["equivalence"] = {"pooled": equivalence(pooled(d_pp), margin),
                            "categories": {c: equivalence(d, margin) for c, d in d_pp.items()}}
    out["variants"][name] = rec
  if any(gains[a] for a in approx) and not gains[treat]:
    out["verdict"] = "the original study's gain could come from the approximation"
  elif any(gains[a] for a in approx):
    out["verdict"] = "the approximation gains, and so does the exact loss"
  else:
    out["verdict"] = "the approximation does not produce a gain here"
  return out


def headline(scopes: dict) -> dict:
  """The "all" scope's random-effects interval, or its seed-paired one if not estimable."""
  re = scopes["all"]["random_effects"]
  return re if re.get("estimable") else scopes["all"]["seed_paired"]
