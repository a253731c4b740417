"""Study A's report: section functions ``(conclusions) -> lines``, listed in ``SECTIONS``,
and the one writer.

The report is one pipeline: the run's rows and their per-budget records →
``study_a_conclusions.conclusions`` (a typed ``Conclusions``, every number the report
states, computed once) → the sections in ``SECTIONS`` → ``write_report``, which writes
``report.md``, ``conclusions.json`` and ``budget_curve.png`` in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tailjax import io, reporting, runrecord
from tailjax.stats import mean_ci
from tailjax.studies import study_a_ladder, study_a_record, study_a_robustness
from tailjax.evaluation import METRIC_KEYS, METRIC_NAMES
from tailjax.studies.study_a_conclusions import (
    COVARIATE, ORIGINAL, REGIME_METRICS, SELECTION_RULES, Conclusions, conclusions, headline,
    hypothesis_table, rules_bullets)


# ----------------------------------------------------------------------------
# Report sections: each ``(conclusions) -> lines``, in the order of ``SECTIONS``
# ----------------------------------------------------------------------------


def _pp(ci, digits=2) -> str:
  return reporting.interval(ci, scale=100, digits=digits, signed=True)


def effect_text(scope: dict) -> str:
  re = scope["random_effects"]
  return (f"{_pp(scope['seed_paired'])}; RE {_pp(re)}" if re.get("estimable")
          else f"{_pp(scope['seed_paired'])}; RE {re['reason']}")


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _reading(v: dict) -> str:
  return {"better": "tail-aware better", "worse": "tail-aware worse", "mixed": "mixed",
          }.get(v["pooled"], "no significant difference")


def title_section(con: Conclusions) -> list[str]:
  return [f"# Study A: tail-aware vs mean-only flow training ({con.setup.data_kind})", ""]


def answer_section(con: Conclusions) -> list[str]:
  return ["## Answer", ""] + reporting.bullets(answer_lines(con)) + [""]


def answer_lines(con: Conclusions) -> list[str]:
  """The answer's bullets: the pooled pixel-AP reading at the primary point, its budget
  dependence, image AUROC, warnings, the answer by regime and by NLL definition, and the
  original study's headline."""
  lines = [_pixel_ap_answer(con), _headline_metrics(con), _budget_answer(con)]
  lines += [x for x in (_convergence_answer(con), _training_answer(con)) if x]
  vi = con.verdicts["image_auroc"]
  di = con.pooled_diff["image_auroc"]
  lines.append(f"Image AUROC at the same point: pooled {_pp(di.get('with_test', di))} "
               f"pp, reading **{_reading(vi)}**.")
  if con.n_seeds < 3:
    lines.append(f"⚠ Only {con.n_seeds} seed(s): a t-interval with {con.n_seeds - 1} "
                 "degree(s) of freedom is nearly meaningless; use ≥ 3 seeds for conclusions.")
  steps = ORIGINAL["coupling_steps"]
  if int(con.setup.coupling_steps) != steps:
    lines.append(f"This run uses {con.setup.coupling_steps} coupling steps; the original "
                 f"study's (and anomalib's) default is {steps} "
                 "(`configs/fastflow_study.py:arch8` runs the study with it).")
  if con.ladder is not None:
    lines.append(study_a_ladder.answer_line(con.ladder, con.treatment, con.baseline))
  if con.robustness is not None:
    rb = con.robustness
    lines.append(f"**Across flow implementations** (this run beside "
                 + ", ".join(f"`{r['workdir']}`" for r in rb["runs"][1:])
                 + f", {len(rb['categories'])} shared categories): pixel AP effect "
                 f"**{rb['verdict']['pixel_ap']}**, image AUROC effect "
                 f"**{rb['verdict']['image_auroc']}**.")
  if con.by_regime is not None:
    lines.append(regime_answer(con.by_regime))
  if con.tail_nll is None:
    lines.append("Exact vs even-share per-patch NLL in the tail: not in this run's grid (the "
                 "configs' `:even_share` variant adds that arm, with the equivalence test).")
  else:
    nc = con.tail_nll
    parts = [f"{n} ({r['tail_nll']}) {_pp(headline(r['vs_baseline']['pixel_ap']))} pp"
             for n, r in nc["variants"].items()]
    eq = [f"{n} − {nc['exact']} {r['equivalence']['pooled']['mean']:+.2f} pp, 90 % CI "
          f"[{r['equivalence']['pooled']['ci90_lo']:+.2f}, "
          f"{r['equivalence']['pooled']['ci90_hi']:+.2f}] against ±"
          f"{nc['equivalence_margin_pp']:g} pp: **{r['equivalence']['pooled']['verdict']}**"
          for n, r in nc["variants"].items() if "equivalence" in r]
    overlap = nc.get("overlap")
    lines.append(f"**Exact vs approximate per-patch NLL** (pixel AP − {nc['baseline']}, all "
                 f"categories): {'; '.join(parts)}. **{nc['verdict']}**."
                 + (f" Equivalence (TOST): {'; '.join(eq)}." if eq else "")
                 + (f" Top-k overlap of the two rankings: {overlap['reading']}."
                    if overlap else ""))
  h = ORIGINAL["headline"]
  lines.append(f"The original study reported {h['pixel_ap_gain_pp']:+.2f} pp pixel AP "
               f"({h['pixel_ap_percent'][0]:.2f} → {h['pixel_ap_percent'][1]:.2f} %) and image "
               f"AUROC {h['image_auroc_percent'][0]:.2f} → {h['image_auroc_percent'][1]:.2f} % "
               f"on its own data, from {h['runs']}.")
  return lines


def _pixel_ap_answer(con: Conclusions) -> str:
  vp = con.verdicts["pixel_ap"]
  at = ("at the step each row's validation NLL selects (held-out normal training images)"
        if con.primary == "val" else "at the last step (no validation split)")
  per_cat = "; ".join(
      f"{c} {_pp(v)} pp (Holm p = {reporting.pvalue(v['p_holm'])}"
      f"{', ' + ('better' if v['sign'] > 0 else 'worse') if v['sign'] else ''})"
      for c, v in vp["categories"].items())
  het = vp["heterogeneity"]
  d = con.pooled_diff["pixel_ap"]
  if vp.get("test_images"):
    over = f"95 % interval over {con.n_seeds} seeds and the test images"
    test = "seeds and a paired bootstrap over test images"
  else:
    over, test = f"95 % CI over {con.n_seeds} seeds", "paired t-test over seeds"
  return (f"**Pixel AP, {con.treatment} − {con.baseline}, {at}:** pooled over categories "
          f"{_pp(d.get('with_test', d))} pp ({over}). "
          f"Per category ({test}, Holm-corrected over {len(vp['categories'])} "
          f"categories): {per_cat}. Reading: **{_reading(vp)}**"
          + (f"; categories differ (Cochran's Q = {het['q']:.1f}, p = "
             f"{reporting.pvalue(het['p'])}, I² = {100 * het['i2']:.0f} %)"
             if np.isfinite(het["p"]) and het["p"] < 0.05 else "")
          + ".")


def _headline_metrics(con: Conclusions) -> str:
  """Pixel AP and image AUROC together, with pixel AUROC and AUPRO, pooled over
  categories at the primary point (intervals counting the test images where recorded)."""
  parts = []
  for k in METRIC_KEYS:
    d = con.pooled_diff[k]
    parts.append(f"{METRIC_NAMES[k]} {_pp(d.get('with_test', d))}")
  counted = "with_test" in con.pooled_diff["pixel_ap"]
  return (f"**Headline ({con.treatment} − {con.baseline}, pp, pooled over categories):** "
          + "; ".join(parts) + (" (pixel AP and image AUROC: 95 % intervals over seeds and "
                                "test images; pixel AUROC and AUPRO: over seeds)" if counted
                                else " (95 % CI over seeds)")
          + (". Per defect kind: see the table below." if con.by_kind else "."))


def _budget_answer(con: Conclusions) -> str:
  bs = con.budget_sign
  trained = [s for s in con.budgets if s > 0]
  sig = ", ".join(f"{s} ({'+' if v > 0 else '−'})" for s, v in bs["significant"].items()) or "none"
  return ("**Does the answer depend on the training budget?** "
          + ("**Yes**: the pooled difference changes sign across budgets " if bs["depends"] else
             "**No**: the pooled difference keeps one sign at every trained budget ")
          + "(" + ", ".join(f"{s}: {_pp(con.curve[s]['pooled'])}" for s in trained) + "); "
          f"budgets where its CI excludes 0: {sig}. Figure: `budget_curve.png`.")


def _nats(x: float) -> str:
  return f"{x:g} nat" + ("" if x == 1 else "s")


def _convergence_answer(con: Conclusions) -> str | None:
  """The convergence count and the answer read only from rows that reached the plateau."""
  pr = con.plateau_rows
  if pr is None:
    return None
  sens = pr["sensitivity"]
  read = (f"pooled Δ pixel AP {_pp(sens['pixel_ap'])} pp over {sens['pairs']} (category, "
          "seed) pairs" if sens["estimable"] else sens["reason"])
  return (f"**Convergence:** {pr['before_last']} of {pr['rows']} rows reached the plateau "
          f"(validation NLL within {_nats(con.setup.plateau_tol)} per patch of every later "
          f"budget's best) before the last budget; the answer read only from rows that did, "
          f"both arms, as a sensitivity: {read}.")


def _training_answer(con: Conclusions) -> str | None:
  """One bullet on what training does to detection (descriptive; needs step 0)."""
  cv = con.convergence
  if not all("step0" in cell for by_var in cv.values() for cell in by_var.values()):
    return None
  base, treat = con.baseline, con.treatment
  deg = {c: [v for v, cell in by_var.items() if cell["degrades"]] for c, by_var in cv.items()}
  parts = [f"{c} (" + ", ".join(f"{v} {100 * cv[c][v]['change']:+.1f} pp" for v in vs) + ")"
           for c, vs in deg.items() if vs]
  both = [c for c, vs in deg.items() if base in vs and treat in vs]
  less = [c for c in both if cv[c][treat]["change"] > cv[c][base]["change"]]
  text = ("**What training does to detection** (descriptive; rule: pixel AP at the selected "
          "step below the untrained flow's, step 0, in every seed): "
          + ("training degrades detection in " + "; ".join(parts) if parts else
             "training degrades detection in no category and arm") + ".")
  if both:
    text += (f" Both arms lose pixel AP in {', '.join(both)}; {treat} loses less in "
             f"{', '.join(less) or 'none of them'}.")
  rho = [(c, v, cell["spearman_mean"]) for c, by_var in cv.items()
         for v, cell in by_var.items() if np.isfinite(cell.get("spearman_mean", np.nan))]
  if rho:
    pos = [f"{c} {v}" for c, v, r in rho if r > 0]
    text += (f" Validation NLL and test pixel AP across budgets (mean Spearman ρ over seeds): "
             f"ρ > 0, lower validation NLL with worse detection, in {len(pos)} of {len(rho)} "
             "category–arm cells" + (f" ({', '.join(pos)})" if pos else "") + ".")
  return text


def _re_text(re: dict) -> str:
  """A random-effects row: the CI, τ², I², the prediction interval for a new category
  and, with k ≤ 4 categories, the modified-HKSJ interval (a sensitivity)."""
  if not re["estimable"]:
    return re["reason"]
  extra = ""
  if "pi_lo" in re:
    extra = f"; new category [{100 * re['pi_lo']:+.2f}, {100 * re['pi_hi']:+.2f}]"
    mod = re.get("ci_modified") or [np.nan, np.nan]
    if re["k"] <= 4 and np.isfinite(mod[0]):
      extra += f"; modified HKSJ [{100 * mod[0]:+.2f}, {100 * mod[1]:+.2f}]"
  return f"{_pp(re)} (τ² = {1e4 * re['tau2']:.3g} pp², I² = {100 * re['i2']:.0f} %{extra})"


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
  head = (f"**Across categories** ({len(br['categories'])} categories; tiers: {tiers}; a "
          "description: categories differ in many ways at once, so this is no "
          "dose–response): pixel AP "
          f"random-effects pooled (REML, HKSJ) {text}")
  if re["estimable"]:
    head += (f", prediction interval for a new category [{100 * re['pi_lo']:+.2f}, "
             f"{100 * re['pi_hi']:+.2f}] pp")
  head += f", **{re['verdict']}**" if re["estimable"] else ""
  head += f"; on {COVARIATE}: {_slope_text(mr)}"
  return head + (f", **{mr['verdict']}**." if mr["estimable"] else ".")




def regime_section(con: Conclusions) -> list[str]:
  """"The answer by regime" (``by_regime``): a table per category, per tier (when
  there are several) and over all categories, then the random-effects and
  meta-regression bullets; [] for a one-category run."""
  br = con.by_regime
  if not br:
    return []
  within = ("pooled seed variance / S plus the category's test-image bootstrap variance"
            if br.get("test_images") else "pooled seed variance / S")
  lines = ["## The answer by regime (across categories: a description)", "",
           f"{con.treatment} − {con.baseline} at the primary point, pp with 95 % "
           f"CI. Seed-paired: the mean over the scope's categories per seed, t-interval over "
           f"{con.n_seeds} seeds. Random effects: across the scope's categories, each "
           f"(mean difference, {within}), REML τ², HKSJ interval. Detectability: "
           f"{br['covariate']}. **Confounded:** categories differ in many ways at once (the "
           "texture benchmark's tiers in photographs, defect generator — half-strength "
           "contours vs exact masks —, mask rule and strength), and the covariate is the "
           "baseline arm's own test result; a slope or tier difference here describes these "
           "categories and is not evidence of a dose–response (a difficulty ladder, "
           "`data.ladder`, varies strength alone).", ""]
  lines += reporting.table(["scope", "tier", "k", f"{COVARIATE} (%)", "Δ pixel AP (pp)",
                            "Δ image AUROC (pp)"], _regime_rows(br))
  return lines + [""] + reporting.bullets(_regime_items(br)) + [""]


def _regime_rows(br: dict) -> list[list]:
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
  return body


def _regime_items(br: dict) -> list[str]:
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
  return items


def nll_section(con: Conclusions) -> list[str]:
  """"Exact vs approximate per-patch NLL": the table of ``nll_comparison``, the
  equivalence tests of approximate − exact pixel AP, the top-k overlap of the two
  rankings (with the mechanism analyses) and the verdict; [] when the run has no
  approximate variant."""
  nc = con.tail_nll
  if not nc:
    return []
  body = []
  for name, rec in nc["variants"].items():
    for scope in rec["vs_baseline"]["pixel_ap"]:
      row = [name, rec["tail_nll"], scope,
             effect_text(rec["vs_baseline"]["pixel_ap"][scope]),
             effect_text(rec["vs_baseline"]["image_auroc"][scope])]
      row += ([effect_text(rec["vs_exact"]["pixel_ap"][scope]),
               effect_text(rec["vs_exact"]["image_auroc"][scope])]
              if "vs_exact" in rec else [reporting.DASH, reporting.DASH])
      body.append(row)
  m = nc.get("equivalence_margin_pp")
  lines = ["## Exact vs approximate per-patch NLL in the tail", "",
           "The tail (top-k selection and its average) ranked by the exact per-location NLL, "
           "by ½‖z‖² alone (`sq_norm`), or by ½‖z‖² minus an even share of the image log-det "
           "(`even_share`, what a user of a flow that returns one log-det per image — "
           "anomalib/FrEIA FastFlow — can compute); the mean term is the exact mean NLL in "
           "all. Neither is a patch likelihood: with 3×3 couplings and image-level LayerNorm "
           "a location's log-det depends on its neighbours, and both definitions split the "
           "same joint NLL (their sum over locations) two ways — per location, or evenly. "
           f"Differences in pp at the primary point: seed-paired (t over {con.n_seeds} "
           "seeds) and random effects across the scope's categories (RE, REML, HKSJ).", ""]
  lines += reporting.table(
      ["variant", "tail NLL", "scope", f"Δ pixel AP vs {nc['baseline']}",
       f"Δ image AUROC vs {nc['baseline']}", f"Δ pixel AP vs {nc['exact']}",
       f"Δ image AUROC vs {nc['exact']}"], body)
  eq_rows = []
  for n, r in nc["variants"].items():
    if "equivalence" not in r:
      continue
    scopes = {"all (per-seed mean over categories)": r["equivalence"]["pooled"],
              **r["equivalence"]["categories"]}
    eq_rows += [[f"{n} − {nc['exact']}", scope, _equivalence_cells(e), e["verdict"]]
                for scope, e in scopes.items()]
  if eq_rows:
    lines += ["", f"Equivalence of the pixel AP (TOST, α = 0.05, margin ±{m:g} pp fixed before "
              "the run in `report.equivalence_margin_pp`): equivalent iff the 90 % interval "
              "lies inside the margin; different iff the 95 % interval excludes 0.", ""]
    lines += reporting.table(["difference", "scope", "mean [95 % CI] {90 % CI}, TOST p",
                              "reading"], eq_rows)
  ov = nc.get("overlap")
  if ov:
    lines += ["", "Manipulation check: overlap (Jaccard) of the exact and the even-share top-k "
              "sets per held-out normal validation image, on each trained row (all seeds): "
              "mean [95 % CI], median, 10th percentile.", ""]
    names = list(dict.fromkeys(n for v in ov["categories"].values() for n in v))
    lines += reporting.table(
        ["category", *names],
        [[c, *(_overlap_cell(v[n]) if n in v else reporting.DASH for n in names)]
         for c, v in ov["categories"].items()])
  items = [f"{n} − {nc['exact']} (pixel AP, all categories): "
           f"**{r['equivalence']['pooled']['verdict']}**; 95 % CI vs 0: "
           f"{r['vs_exact_reading']}." for n, r in nc["variants"].items() if "equivalence" in r]
  items.append(f"Top-k overlap: **{ov['reading']}**." if ov else
               "Top-k overlap: not measured (needs the mechanism analyses).")
  items.append(f"Could the original study's gain come from the approximation? "
               f"**{nc['verdict']}** (rule: `study_a_conclusions.nll_comparison`).")
  return lines + [""] + reporting.bullets(items) + [""]


def _equivalence_cells(e: dict) -> str:
  if "tost_p" not in e:
    return reporting.DASH
  return (f"{e['mean']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}] "
          f"{{{e['ci90_lo']:+.2f}, {e['ci90_hi']:+.2f}}}, {reporting.pvalue(e['tost_p'])}")


def _overlap_cell(s: dict) -> str:
  mc = s["mean"]
  return (f"{mc['mean']:.3f} [{mc['lo']:.3f}, {mc['hi']:.3f}], {s['median']:.3f}, "
          f"{s['p10']:.3f} (n = {s['n_images']})")


def budget_figure_section(con: Conclusions) -> list[str]:
  return ["![budget curve](budget_curve.png)", ""]


def setup_section(con: Conclusions) -> list[str]:
  """How the run was made: features, flow, training, seeds, variants, evaluation, and the
  rules fixed before the run."""
  s = con.setup
  history = "".join(f" It was trained to {e.get('from_train.num_steps')} steps first, then "
                    f"extended to {e.get('to_train.num_steps')} (`--extend` on {e['at']}; "
                    f"states and evaluations up to step {e.get('from_train.num_steps')} are "
                    "reused, see `manifest.json`)." for e in s.extended)
  variants = ", ".join(f"**{v.name}** (λ = {v.tail_weight}, r = {v.top_k_ratio}"
                       + (f", tail ranked by the {v.tail_nll} NLL" if v.tail_nll != "exact"
                          else "") + ")" for v in s.variants)
  h, w = s.grid
  return ["## Setup", "",
          f"Generated by `tailjax train`; training and evaluation took {s.seconds / 60:.1f} min "
          f"(the last invocation).{history} "
          f"Features: {s.features} ({h}×{w} patches), flow: "
          f"{s.coupling_steps} coupling steps, kernels {s.kernel_mode}, LayerNorm "
          f"{s.layer_norm}; {s.train_steps} steps of batch {s.batch_size}, "
          f"{s.optimizer} lr {s.learning_rate}; seeds {list(s.seeds)}; "
          f"{s.n_val} normal training images per category held out for validation (never "
          "trained on; the test set is not used to select anything). Variants: "
          + variants
          + f". Every row is evaluated at steps {list(con.budgets)}. Anomaly score: "
          f"per-patch {s.score}, bilinear upsampling to {s.size} px, Gaussian "
          f"σ = {s.smoothing_sigma} px, image score = {s.image_score} of the map. "
          "PaDiM (no training) is the reference row.", "",
          "Rules (fixed before the run):", ""] + rules_bullets() + [""]


def final_section(con: Conclusions) -> list[str]:
  """The last step's table: every variant (mean ± std over seeds), the paired difference
  with its 95 % CI, and PaDiM, per category and averaged over categories."""
  base, treat, summary = con.baseline, con.treatment, con.final
  body = []
  scopes = list(summary["categories"].items()) + [("**mean**", summary["mean"])]
  for name, table in scopes:
    for var in summary["variants"]:
      body.append([name, var] + [reporting.mean_std(table[var][k]["values"]) for k in METRIC_KEYS])
    if "difference" in table:
      body.append([name, f"{treat} − {base}"] + [
          reporting.interval(table["difference"][k], scale=100, digits=2, signed=True)
          for k in METRIC_KEYS])
    body.append([name, "PaDiM"] + [_pct(table["padim"][k]) for k in METRIC_KEYS])
  return [f"## Results at the last step ({con.setup.train_steps})", "",
          "All numbers in %, mean ± std over seeds. The difference row is "
          f"{treat} − {base} per seed (same initial weights and batches), with its 95 % "
          "t-interval over seeds.", ""] + reporting.table(
              ["category", "method"] + [METRIC_NAMES[k] for k in METRIC_KEYS], body) + [""]


def budget_section(con: Conclusions) -> list[str]:
  """Both variants and their difference at every budget, per category and pooled."""
  base, treat = con.baseline, con.treatment
  lines = ["## Budget curve", "",
           "Every row evaluated at each budget of the same run (no retraining); the difference "
           "is tail − mean per seed, pooled = mean over categories per seed.", ""]
  for scope, by_step in con.budget_table.items():
    body = []
    for s, b in by_step.items():
      vals = b["values"]
      body.append([s, reporting.mean_std(vals[base]["pixel_ap"]),
                   reporting.mean_std(vals[treat]["pixel_ap"]), _pp(b["pixel_ap_diff"]),
                   reporting.mean_std(vals[base]["image_auroc"]),
                   reporting.mean_std(vals[treat]["image_auroc"]), _pp(b["image_auroc_diff"])])
    lines += [f"**{scope}**", ""]
    lines += reporting.table(["step", f"{base} pixel AP", f"{treat} pixel AP",
                              "difference [95 % CI]", f"{base} image AUROC",
                              f"{treat} image AUROC", "difference"], body)
    lines.append("")
  return lines


def selection_section(con: Conclusions) -> list[str]:
  """The steps each rule selects from the validation NLL alone, and the paired
  differences there."""
  lines = ["## Model selection without the test set", "",
           "Steps chosen per row (seed order) from the validation NLL alone; the metrics are "
           "the paired differences (pp, 95 % CI) at those steps.", ""]
  if not con.selected:
    return lines + ["No validation split (`data.val_fraction` = 0): no model selection; every "
                    "number is at the last step.", ""]
  base, treat = con.baseline, con.treatment
  body = [[name, c, ", ".join(map(str, v["steps"][base])), ", ".join(map(str, v["steps"][treat])),
           *(_pp(v["diff"][k]) for k in METRIC_KEYS)]
          for rule, name in SELECTION_RULES for c, v in con.selection[rule].items()]
  pr = con.plateau_rows
  per_cat = ", ".join(f"{c} {v['before_last']}/{v['rows']}" for c, v in pr["categories"].items())
  note = (f"The validation NLL reached a plateau (rule: within "
          f"{_nats(con.setup.plateau_tol)} per patch of every later budget's best) before the "
          f"last budget in "
          f"{pr['before_last']} of {pr['rows']} rows ({per_cat})"
          + ("." if pr["before_last"] == pr["rows"] else
             "; the others were still improving at the last budget, so a longer ladder could "
             "change their selected step."))
  return lines + reporting.table(["rule", "scope", f"{base} steps", f"{treat} steps",
                                  *(f"Δ {METRIC_NAMES[k]}" for k in METRIC_KEYS)], body) + [
      "", note, ""]


def convergence_section(con: Conclusions) -> list[str]:
  """Per category and variant, descriptive (never used for selection): the untrained flow
  (step 0), the selected step, the best over the budgets (reads the test set) and the rank
  correlation of validation NLL with test pixel AP across budgets."""
  cv = con.convergence
  lines = ["## Convergence and what training does to detection", "",
           "Descriptive, never used for selection. Pixel AP in %, mean ± std over seeds. "
           "*Step 0* is the untrained flow, a reference; *selected* is each row at its "
           "primary evaluation step; *ceiling* is each row's best test pixel AP over the "
           "budgets (it reads the test set: a ceiling, not a result). ρ is Spearman's rank "
           "correlation across budgets of a row's validation NLL and its test pixel AP, mean "
           "over seeds: ρ > 0 means lower validation NLL goes with worse detection. Rule "
           "(fixed before the run): training degrades detection in a category and arm iff "
           "pixel AP at the selected step lies below its step-0 value in every seed.", ""]
  body = []
  for c, by_var in cv.items():
    for v, cell in by_var.items():
      has0 = "step0" in cell
      body.append([
          c, v, reporting.mean_std(cell["step0"]) if has0 else "—",
          ", ".join(map(str, cell["selected_steps"])), reporting.mean_std(cell["selected"]),
          f"{100 * cell['change']:+.2f}" if has0 else "—",
          f"{reporting.mean_std(cell['ceiling'])} ({', '.join(map(str, cell['ceiling_steps']))})",
          f"{cell['spearman_mean']:+.2f}" if np.isfinite(cell.get("spearman_mean", np.nan))
          else "—",
          ("**yes**" if cell["degrades"] else "no") if has0 else "—"])
  lines += reporting.table(
      ["category", "arm", "step 0 pixel AP", "selected steps", "pixel AP at selected",
       "selected − step 0 (pp)", "ceiling (test set; steps)", "ρ(val NLL, pixel AP)",
       "training degrades"], body)
  return lines + [""]


def causal_section(con: Conclusions) -> list[str]:
  """The causal chain L1 → L4: each link's rule, measurement and verdict, the links'
  Holm-corrected p-values, and L2/L3 with both models at the same step."""
  holm = ", ".join(f"{k}: {reporting.pvalue(v)}" for k, v in con.link_holm.items())
  return (["## The causal chain", "",
           "The original study's story: concentration (L1) → better learning of the normal "
           "distribution's boundary (L2) → more precise scoring at defect boundaries (L3) → "
           "higher pixel AP (L4). Each link at the primary evaluation point.", ""]
          + reporting.table(["link", "rule (fixed before the run)", "measurement", "verdict"],
                            _link_rows(con))
          + ["", f"Holm-corrected p-values of the links' tests: {holm}. The budget curve, the "
             "hypothesis table's H3/H7 statistics and the gradient norms are descriptive.", ""]
          + same_step_table(con))


def _link_rows(con: Conclusions) -> list[list[str]]:
  L, s = con.links, con.setup
  lam = s.variant(con.treatment).tail_weight
  rows = []
  if "L1" in L:
    ev = "; ".join(f"{c}: share {v['treatment']['share']:.3f} vs null {v['treatment']['null']:.3f}, "
                   f"excess {reporting.interval(v['treatment']['excess'], signed=True)} "
                   f"(mean-only model: {v['baseline']['share']:.3f} vs {v['baseline']['null']:.3f})"
                   for c, v in L["L1"]["categories"].items())
    rows.append(["L1 concentration", f"tail share of the update (λ = {lam}) − λ + (1−λ)k/N, CI over "
                 "images above 0 in every category", ev, f"**{L['L1']['verdict']}**"])
  else:
    rows.append(["L1 concentration", "needs the analysis (`mechanisms.enabled`)", "—", "NOT TESTED"])
  if "L2" in L:
    l2 = L["L2"]
    rows.append(["L2 boundary learning", "normal tail gap p99.5 − p50 of held-out normal patch NLL, "
                 "pooled paired Δ below 0",
                 f"Δ gap {reporting.interval(l2['gap'], signed=True)} nats; Δ p99.5 "
                 f"{reporting.interval(l2['p99.5'], signed=True)}; Δ pixel FPR@TPR "
                 f"{s.fixed_tpr} {_pp(l2['fpr'])} pp", f"**{l2['verdict']}**"])
  l3 = L["L3"]
  rows.append(["L3 scoring at boundaries", f"pixel AP on the {s.boundary_px}-px border band: "
               "pooled paired Δ above 0 and above the interior's",
               f"Δ band AP {_pp(l3['band'])} pp, Δ interior AP {_pp(l3['interior'])} pp",
               f"**{l3['verdict']}**"])
  l4 = L["L4"]
  rows.append(["L4 outcome", "pixel AP, per-category Holm verdicts", f"pooled Δ {_pp(l4['pooled'])} pp, "
               f"reading {l4['reading']}", f"**{l4['verdict']}**"])
  return rows


def same_step_table(con: Conclusions) -> list[str]:
  """L2 and L3 with both models at the same budget (descriptive, pooled paired Δ, 95 % CI)."""
  same = con.links_same_step or {}
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


def examples_section(con: Conclusions) -> list[str]:
  lines = ["## Anomaly-map examples", ""]
  for c in con.setup.examples:
    lines += [f"![{c}]({c}/examples.png)", ""]
  return lines


def mechanisms_section(con: Conclusions) -> list[str]:
  """The mechanism analyses' hypothesis table (``mechanisms``); [] without them."""
  if con.mechanisms is None:
    return []
  return (["## Mechanism analyses", "",
           "Full tables, rules and figures: [analysis/report.md](analysis/report.md).", ""]
          + hypothesis_table(con.mechanisms) + [""])


def ladder_section(con: Conclusions) -> list[str]:
  """The within-category dose–response on the difficulty ladder; [] without a ladder."""
  if con.ladder is None:
    return []
  return study_a_ladder.section_lines(con.ladder, con.treatment, con.baseline)


def robustness_section(con: Conclusions) -> list[str]:
  """The effect beside other flow implementations' runs; [] without ``report.compare_runs``."""
  if con.robustness is None:
    return []
  return study_a_robustness.section_lines(con.robustness, con.treatment, con.baseline)


def kind_section(con: Conclusions) -> list[str]:
  """Per defect kind at the primary point (``defect_kinds``); [] without the records."""
  if not con.by_kind:
    return []
  base, treat = con.baseline, con.treatment
  body = [[kind, ", ".join(v["categories"]), v["n"],
           _pct(v["pixel_ap"]["base"]), _pct(v["pixel_ap"]["treat"]), _pp(v["pixel_ap"]["delta"]),
           _pct(v["image_auroc"]["base"]), _pct(v["image_auroc"]["treat"]),
           _pp(v["image_auroc"]["delta"])] for kind, v in con.by_kind.items()]
  return (["## By defect kind", "",
           "Each kind's defective test images with every good image of their category, at "
           "the primary point; arms: mean over seeds and categories (%); Δ: "
           f"{treat} − {base} per seed (mean over the categories with that kind), 95 % "
           "t-interval over seeds.", ""]
          + reporting.table(["defect kind", "categories", "defective images",
                             f"{base} pixel AP", f"{treat} pixel AP", "Δ pixel AP (pp)",
                             f"{base} image AUROC", f"{treat} image AUROC",
                             "Δ image AUROC (pp)"], body) + [""])


SECTIONS: tuple[Callable[[Conclusions], list[str]], ...] = (
    title_section, answer_section, ladder_section, robustness_section, kind_section,
    regime_section, nll_section, budget_figure_section,
    setup_section, final_section, budget_section, selection_section, convergence_section,
    causal_section, examples_section, mechanisms_section)


# ----------------------------------------------------------------------------
# The one writer
# ----------------------------------------------------------------------------


def report_lines(con: Conclusions) -> list[str]:
  """The report's markdown lines: every section of ``SECTIONS`` in order."""
  return [line for section in SECTIONS for line in section(con)]


def write_report(workdir: str | Path, con: Conclusions) -> list[str]:
  """Writes ``report.md``, ``conclusions.json`` and ``budget_curve.png`` of ``con`` into
  ``workdir`` (each atomically) and returns the report's lines."""
  workdir = Path(workdir)
  lines = report_lines(con)
  budget_figure(workdir / "budget_curve.png", con)
  io.atomic_write_json(workdir / "conclusions.json", con.to_json())
  reporting.write_markdown(workdir / "report.md", lines)
  return lines


def report(cfg, workdir: str | Path, results: dict, summary: dict, seconds: float,
           analysis: dict | None = None) -> list[str]:
  """``conclusions`` of a run's results (and analyses) and ``write_report``, in one pass.
  The run facts come from the workdir: its manifest's extensions and the categories
  whose ``examples.png`` exists."""
  workdir = Path(workdir)
  con = conclusions(cfg, results, analysis, summary=summary, seconds=seconds,
                    extended=runrecord.read_manifest(workdir).get("extended", []),
                    examples=[c for c in results if (workdir / c / "examples.png").exists()])
  return write_report(workdir, con)


def rewrite_report(workdir: str | Path, analysis: dict | None = None) -> list[str]:
  """The report of a finished run, from its saved records (``metrics.json``, the
  manifest's config) and the given analyses: what ``tailjax analyze`` writes after
  analysing a run that was trained without them."""
  workdir = Path(workdir)
  f = workdir / "metrics.json"
  if not f.is_file():
    raise FileNotFoundError(f"{f} not found: {workdir} is not a finished `tailjax train` run")
  saved = json.loads(f.read_text())
  return report(study_a_record.load_config(workdir), workdir, saved["categories"],
                saved["summary"], saved["seconds"], analysis)


def budget_figure(path: Path, con: Conclusions) -> None:
  """Pixel AP of both variants (mean, 95 % CI over seeds) and their difference across
  the budget ladder, one column per scope of ``budget_table``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  base, treat = con.baseline, con.treatment
  scopes = list(con.budget_table)
  steps = list(con.budgets)
  x = [max(s, 1) for s in steps]                      # log axis: the untrained flow at 1
  fig, axes = plt.subplots(2, len(scopes), figsize=(3.6 * len(scopes), 6.2), squeeze=False)
  for j, scope in enumerate(scopes):
    ax, dx = axes[0, j], axes[1, j]
    by_step = con.budget_table[scope]
    for var, color in ((base, "tab:blue"), (treat, "tab:red")):
      m, lo, hi = _band([mean_ci(by_step[s]["values"][var]["pixel_ap"]) for s in steps])
      ax.plot(x, m, "o-", color=color, label=var)
      ax.fill_between(x, lo, hi, color=color, alpha=0.2)
    dm, dlo, dhi = _band([by_step[s]["pixel_ap_diff"] for s in steps])
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


def _band(cis: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, lo, hi) in % of intervals; an undefined end is drawn at the mean."""
  m = np.array([100 * c["mean"] for c in cis])
  lo = np.array([100 * c["lo"] if np.isfinite(c["lo"]) else 100 * c["mean"] for c in cis])
  hi = np.array([100 * c["hi"] if np.isfinite(c["hi"]) else 100 * c["mean"] for c in cis])
  return m, lo, hi
