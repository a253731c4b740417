"""Mechanism analyses of a trained study-A run: H1, H3, H4, H7 → JSON, figures, report.

  analyze_run(workdir)      analyses every category of the run — the trained rows in
                            memory when ``study_a.main`` hands them over, else reloaded
                            from the checkpoints (``study_a_record.load_trained``) — writes
                            <workdir>/analysis/{analysis.json, report.md, *.png,
                            <category>_per_patch.npz} and returns the results;
  append_to_report(workdir) rewrites <workdir>/report.md with the analyses as its
                            "Mechanism analyses" section and the causal chain's L1 link
                            (``study_a_report.rewrite_report``), for a run trained
                            without them.

Which model: every analysis except H7 uses the *analysed model*, the first
seed of the run's treatment variant (``cfg.report.treatment``, e.g. λ = 0.7,
r = 0.02). H3 compares losses λ ∈ {0, λ_run, 1} on that one model and the
same images (the original study's design); H7 calibrates z of every row (all
variants and seeds) so tail-aware and mean-only can be compared seed by seed.
Images: H1 and H4 use every training image (forward passes only); H3 uses
``num_images`` training images (a seeded random subset) in input space and the
first ``num_param_images`` of those (default: all) in parameter space, where the
exact per-patch gradients of one image cost about 0.2 of an ordinary backward
pass over a batch of N images (``benchmarks/bench_gradients.py``).
``nll_overlap`` (the exact vs even-share manipulation check, key "nll_overlap" of each
category) uses every seed of every tail-aware variant on the validation images, and
the test images descriptively.

The original study's numbers (``study_a_conclusions.ORIGINAL``, from
``original_study.json``) are shown beside ours in the report's tables.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import evaluation, io, losses, reporting, runrecord
from tailjax.analysis import causal, gradients
from tailjax.analysis import hypotheses as hyp
from tailjax.stats import mean_ci
from tailjax.studies import study_a_conclusions, study_a_record, study_a_report

ORIGINAL = study_a_conclusions.ORIGINAL["hypotheses"]


# ----------------------------------------------------------------------------
# One category
# ----------------------------------------------------------------------------


def _pick_rows(cfg, rows: list[dict]) -> tuple[int, int | None]:
  """(treatment row, baseline row): first seeds of cfg.report.treatment / baseline, falling
  back to the largest / smallest λ."""
  names = [r["variant"] for r in rows]
  rep = cfg.get("report", {}) if hasattr(cfg, "get") else {}
  treat, base = rep.get("treatment", None), rep.get("baseline", None)
  ti = names.index(treat) if treat in names else int(np.argmax([r["tail_weight"] for r in rows]))
  bi = names.index(base) if base in names else int(np.argmin([r["tail_weight"] for r in rows]))
  return ti, (bi if rows[bi]["variant"] != rows[ti]["variant"] else None)


def _latents(tc, params, feats) -> np.ndarray:
  """z of every patch of ``feats`` (normalised as in training), pooled: [M·h·w, C]."""
  z = evaluation.latents(tc.model, params, feats, conv_impl=tc.program.conv_impl)
  return z.reshape(-1, z.shape[-1])


def _calibration_by_row(tc, normal_feats) -> list[dict]:
  """``latent_calibration`` of every row; each entry keeps its pooled z under "_z"."""
  cals = []
  for i, row in enumerate(tc.rows):
    z = _latents(tc, evaluation.row_params(tc.params_R, i), normal_feats)
    cals.append({"variant": row["variant"], "seed": row["seed"], "tail_weight": row["tail_weight"],
                 **hyp.latent_calibration(z), "_z": z})
  return cals


def _l1(tc: study_a_record.TrainedCategory, i: int, feats, top_k_ratio: float | None = None) -> dict:
  """L1 for row i under its own training loss: per-image share of the update made by its
  top-k patches vs the construction null λ + (1 − λ)·k/N (``causal.l1_excess``)."""
  row = tc.rows[i]
  lam = float(row["tail_weight"])
  r = float(row["top_k_ratio"] if top_k_ratio is None else top_k_ratio)
  params = evaluation.row_params(tc.params_R, i)
  nll = gradients.batch_nll(tc.model, params, feats)
  tail = gradients.tail_mask(nll, r)
  w = gradients.loss_weights(nll, lam, r)
  share = causal.per_image_update_share(tc.model, params, feats, w, tail)
  n = nll.shape[1]
  out = causal.l1_excess(share, causal.construction_null(lam, int(tail[0].sum()), n))
  return {**out, "variant": row["variant"], "seed": row["seed"], "tail_weight": lam,
          "top_k_ratio": r}


def analyze_category(tc: study_a_record.TrainedCategory, images_train: np.ndarray | None, *,
                     num_images: int = 32, num_param_images: int | None = None, method: str = "auto",
                     patch_chunk: int | None = None, image_chunk: int = 1, sweep_rows: Sequence[dict] = (),
                     run_rows_metrics: Sequence[dict] = (), seed: int = 0) -> dict:
  """H1, H3, H4, H7 and their verdicts for one trained category (JSON-ready dict).

  ``images_train``: the training images in ``train_feats`` order (None: no image-space
  statistics); ``num_images`` … ``image_chunk``: H3's images and per-patch gradient
  settings (``gradients.gradient_concentration``); ``sweep_rows``: sweep results for H4's
  performance side; ``run_rows_metrics``: the run's rows with their final metrics
  (copied into the result for the ablation); ``seed``: H1's Monte Carlo and H3's subset.
  """
  t0 = time.time()
  ti, bi = _pick_rows(tc.cfg, tc.rows)
  run = tc.rows[ti]
  feats = np.asarray(tc.data.train_feats)
  nll_train = gradients.batch_nll(tc.model, evaluation.row_params(tc.params_R, ti), feats)
  timings = {}
  t = time.time()
  h1 = _h1(tc, ti, feats, nll_train, images_train, seed)
  timings["h1"], t = time.time() - t, time.time()
  h3, l1 = _h3(tc, ti, bi, feats, num_images=num_images, num_param_images=num_param_images,
               method=method, patch_chunk=patch_chunk, image_chunk=image_chunk, seed=seed)
  timings["h3"], t = time.time() - t, time.time()
  h4 = _h4(tc, ti, feats, nll_train, sweep_rows)
  timings["h4"], t = time.time() - t, time.time()
  h7 = _h7(tc, ti, bi)
  timings["h7"], t = time.time() - t, time.time()
  overlap = nll_overlap(tc)
  timings["nll_overlap"] = time.time() - t
  h, w = feats.shape[1:3]
  return {"category": tc.data.name, "l1": l1,
          "analysed_row": {k: run[k] for k in ("variant", "seed", "tail_weight", "top_k_ratio")},
          "n_train": int(len(feats)), "grid": [int(h), int(w)], "h1": h1, "h3": h3, "h4": h4,
          "h7": h7, "nll_overlap": overlap, "run_rows": list(run_rows_metrics),
          "seconds": time.time() - t0, "timings": timings}


def _h1(tc, ti: int, feats, nll_train, images_train, seed: int) -> dict:
  """H1 on all training images: where the analysed model's tail patches lie."""
  h, w = feats.shape[1:3]
  r = float(tc.rows[ti]["top_k_ratio"])
  h1 = hyp.tail_location(nll_train, (h, w), r, images_train, seed=seed)
  tail_train = gradients.tail_mask(nll_train, r)
  h1["image_level"] = {"border": causal.border_distance_contrast(tail_train, (h, w))}
  if images_train is not None:
    sob = hyp.patch_sobel(images_train, (h, w)).reshape(len(feats), -1)
    h1["image_level"]["sobel"] = causal.image_level_contrast(sob, tail_train)
  h1["verdict"], h1["evidence"] = hyp.verdict_h1(h1)
  return h1


def _h3(tc, ti: int, bi: int | None, feats, *, num_images: int, num_param_images, method,
        patch_chunk, image_chunk, seed: int) -> tuple[dict, dict]:
  """H3 on a seeded subset of the training images: gradient concentration under λ ∈
  {0, λ_run, 1}, and L1 (each trained model's own update share vs the construction null)."""
  run = tc.rows[ti]
  lam, r = float(run["tail_weight"]), float(run["top_k_ratio"])
  n_img = min(int(num_images), len(feats))
  idx = np.sort(np.random.default_rng(seed).choice(len(feats), n_img, replace=False))
  h3 = gradients.gradient_concentration(tc.model, evaluation.row_params(tc.params_R, ti),
                                        feats[idx], (0.0, lam, 1.0), r,
                                        num_param_images=num_param_images, method=method,
                                        patch_chunk=patch_chunk, image_chunk=image_chunk)
  h3["image_indices"] = idx.tolist()
  l1 = {"treatment": _l1(tc, ti, feats[idx])}
  if bi is not None:
    l1["baseline"] = _l1(tc, bi, feats[idx], top_k_ratio=r)
  h3["verdict"], h3["evidence"] = hyp.verdict_h3(l1["treatment"], lam)
  return h3, l1


def _h4(tc, ti: int, feats, nll_train, sweep_rows: Sequence[dict]) -> dict:
  """H4: top-k purity on all training images against an independent model's hard set
  (another seed of the same variant), performance from the sweep."""
  run = tc.rows[ti]
  lam, r = float(run["tail_weight"]), float(run["top_k_ratio"])
  other = [i for i, row in enumerate(tc.rows)
           if row["variant"] == run["variant"] and row["seed"] != run["seed"]]
  hard_nll = (gradients.batch_nll(tc.model, evaluation.row_params(tc.params_R, other[0]), feats)
              if other else None)
  h4: dict[str, Any] = {"dilution": hyp.topk_dilution(nll_train, hard_nll_BxN=hard_nll),
                        "hard_set_seed": tc.rows[other[0]]["seed"] if other else None}
  summary = hyp.sweep_summary(sweep_rows, [tc.data.name]) if sweep_rows else []
  lams_in_sweep = {e["tail_weight"] for e in summary}
  sweep_lam = lam if any(abs(l - lam) < 1e-6 for l in lams_in_sweep) else (
      max(lams_in_sweep, key=lambda l: len(hyp.sweep_axis(summary, "top_k_ratio", l)))
      if lams_in_sweep else None)
  h4["sweep_lambda"] = sweep_lam
  h4["sweep_r_axis"] = hyp.sweep_axis(summary, "top_k_ratio", sweep_lam) if sweep_lam is not None else []
  h4["sweep_lambda_axis"] = hyp.sweep_axis(summary, "tail_weight", r) if summary else []
  h4["performance"] = (hyp.performance_drop(h4["sweep_r_axis"], r)
                       if len(h4["sweep_r_axis"]) > 1 else None)
  h4["verdict"], h4["evidence"] = hyp.verdict_h4(h4["dilution"], r, h4["performance"])
  return h4


def _h7(tc, ti: int, bi: int | None) -> dict:
  """H7 on the normal test images: calibration of z for every row, by variant, and the
  analysed model's histogram."""
  data = tc.data
  normal = np.asarray(data.test_feats)[np.asarray(data.test_labels) == 0]
  if len(normal) == 0:
    raise ValueError(f"category {data.name!r}: no normal test images for the H7 calibration")
  cals = _calibration_by_row(tc, normal)
  z_an = cals[ti]["_z"]
  for c in cals:
    del c["_z"]
  dens, edges = np.histogram(np.clip(z_an.ravel(), -5, 5), bins=80, range=(-5, 5), density=True)
  treat_name = tc.rows[ti]["variant"]
  base_name = tc.rows[bi]["variant"] if bi is not None else None
  by_seed = lambda name: {c["seed"]: c["tail_error"] for c in cals if c["variant"] == name}
  te, be = by_seed(treat_name), (by_seed(base_name) if base_name else {})
  seeds = sorted(set(te) & set(be))
  first = {}
  for c in cals:
    first.setdefault(c["variant"], c)
  h7 = {"analysed": cals[ti], "analysed_variant": treat_name, "baseline_variant": base_name,
        "rows": [{k: v for k, v in c.items() if not k.startswith("qq_")} for c in cals],
        "by_variant": _calibration_by_variant(cals), "first_seed_by_variant": first,
        "paired_seeds": seeds, "n_normal_images": int(len(normal)),
        "histogram": {"edges": edges.tolist(), "density": dens.tolist()}}
  h7["verdict"], h7["evidence"] = hyp.verdict_h7(
      cals[ti], [be[s] for s in seeds] if seeds else None, [te[s] for s in seeds] if seeds else None)
  return h7


@functools.partial(jax.jit, static_argnums=0)
def _nll_and_logdet(model, params, x_BxHxWxC):
  z, logdet_BxHxW = model.apply(params, x_BxHxWxC)
  return losses.patch_nll(z, logdet_BxHxW), logdet_BxHxW


def definition_scores(model, params, feats_BxHxWxC) -> dict[str, np.ndarray]:
  """{definition: score_BxN} of every per-patch NLL definition (``losses.NLL_DEFINITIONS``)
  of one model on ``feats``: the exact per-location NLL plus ``losses.selection_shift`` —
  the scores the tail-aware loss ranks its top-k by."""
  nll, logdet = _nll_and_logdet(model, params, jnp.asarray(feats_BxHxWxC))
  out = {}
  for name in losses.NLL_DEFINITIONS:
    a, b = losses.nll_definition_weights(name)
    s = nll + losses.selection_shift(logdet, a, b)
    out[name] = np.asarray(s.reshape(s.shape[0], -1))
  return out


def nll_overlap(tc: study_a_record.TrainedCategory) -> dict:
  """The manipulation check of exact vs even-share: for every seed of every tail-aware
  variant (λ > 0), the overlap (``causal.topk_jaccard``) of the exact and the even-share
  top-k sets per image at the row's own r, on the held-out normal validation images and,
  descriptively, on the test images (normal and defective). Per variant: its
  ``tail_nll``, r, k and per split ``causal.overlap_summary`` over images × seeds plus
  each seed's mean. Selects nothing. {} for a run without tail-aware rows."""
  variants = tc.cfg.get("variants", {}) if hasattr(tc.cfg, "get") else {}
  splits = {"val": np.asarray(tc.data.val_feats), "test": np.asarray(tc.data.test_feats)}
  n = int(np.prod(tc.data.train_feats.shape[1:3]))
  per: dict[str, dict] = {}
  for i, row in enumerate(tc.rows):
    if float(row["tail_weight"]) <= 0:
      continue
    r = float(row["top_k_ratio"])
    v = per.setdefault(row["variant"], {
        "tail_nll": str(variants.get(row["variant"], {}).get("tail_nll", "exact")),
        "top_k_ratio": r, "k": int(losses.top_k_count(r, n)), "seeds": [],
        "_j": {k: [] for k in splits}})
    v["seeds"].append(row["seed"])
    params = evaluation.row_params(tc.params_R, i)
    for split, feats in splits.items():
      if len(feats):
        sc = definition_scores(tc.model, params, feats)
        v["_j"][split].append(causal.topk_jaccard(sc["exact"], sc["even_share"], r))
  for v in per.values():
    j = v.pop("_j")
    for split, js in j.items():
      v[split] = ({**causal.overlap_summary(np.concatenate(js)),
                   "seed_means": [float(x.mean()) for x in js]} if js else {"n_images": 0})
  return per


def _calibration_by_variant(cals: list[dict]) -> dict:
  """Per variant: mean and CI over its seeds of each calibration statistic, and its λ."""
  by_variant = {}
  for name in dict.fromkeys(c["variant"] for c in cals):
    vs = [c for c in cals if c["variant"] == name]
    by_variant[name] = {k: mean_ci([c[k] for c in vs])
                        for k in ("mean", "std", "qq_corr", "tail_error", "ks_p_mean", "shapiro_p_mean")}
    by_variant[name]["tail_weight"] = vs[0]["tail_weight"]
  return by_variant


# ----------------------------------------------------------------------------
# Whole run
# ----------------------------------------------------------------------------

RUN_ROW_KEYS = ("variant", "seed", "tail_weight", "top_k_ratio", "tail_nll", "metrics")


def _run_metrics_rows(workdir: Path, cat: str, results: dict | None) -> list[dict]:
  """The run's rows of ``cat`` with their final metrics: from ``results`` when the caller
  has them in memory, else from ``<cat>/metrics.json``."""
  if results is not None and cat in results:
    rows = results[cat]["rows"]
  else:
    f = workdir / cat / "metrics.json"
    if not f.is_file():
      return []
    rows = json.loads(f.read_text()).get("rows", [])
  return [{k: r[k] for k in RUN_ROW_KEYS if k in r} for r in rows]


def _ablation_series(analysis: dict, sweep_rows: Sequence[dict], cats: list[str]) -> tuple[dict, str]:
  """Metric vs λ over the analysed categories: from the sweep at the run's r if it varies λ,
  else from the run's own variants (mean over categories per seed)."""
  run_r = next(iter(analysis["categories"].values()))["analysed_row"]["top_k_ratio"]
  series = {}
  if sweep_rows:
    for key, name in (("pixel_ap", "pixel AP"), ("image_auroc", "image AUROC")):
      try:
        axis = hyp.sweep_axis(hyp.sweep_summary(sweep_rows, cats, metric=key), "tail_weight", run_r)
      except ValueError:
        axis = []
      if len(axis) > 1:
        series[name] = axis
    if series:
      return series, f"sweep results at r = {run_r:g}, mean over {', '.join(cats)}"
  rows = [dict(r, category=c) for c in cats for r in analysis["categories"][c]["run_rows"]]
  if not rows:
    return {}, ""
  for key, name in (("pixel_ap", "pixel AP"), ("image_auroc", "image AUROC")):
    series[name] = hyp.sweep_summary([dict(r, source="run") for r in rows], cats, metric=key)
  return series, f"the run's variants (no λ sweep given), mean over {', '.join(cats)}"


def analyze_run(workdir: str | Path, categories=None, num_images: int = 32,
                sweeps: Sequence[str | Path] | str | None = None, *, num_param_images: int | None = None,
                method: str = "auto", patch_chunk: int | None = None, image_chunk: int = 1,
                seed: int = 0, write: bool = True, verbose: bool = True,
                run: runrecord.Run | None = None,
                trained: dict[str, study_a_record.TrainedCategory] | None = None,
                results: dict | None = None) -> dict:
  """Every mechanism analysis of a trained run; writes ``<workdir>/analysis/``.

  Args:
    workdir: a ``tailjax train`` workdir (study A).
    categories: comma string or list; None = every trained category (of ``trained``
      when given, which holds exactly the categories to analyse).
    num_images: training images for H3 (input space).
    sweeps: directories (or a comma string) holding a sweep's ``results.json``.
    num_param_images: of those, images with exact per-patch parameter gradients (None: all;
      ≈ 50 ms per image with the default ghost norms, 4-step flow, 14×14×112, 2-core CPU).
    method, patch_chunk, image_chunk: see ``gradients.per_patch_param_grads``.
    run: the workdir's open run when the caller holds it (``study_a.main``); otherwise the
      workdir is opened (locked, its manifest checked) here when writing.
    trained: the trained categories in memory (``study_a.main``: the engine's program and
      parameters); None reloads the finished run's checkpoints (``study_a_record.load_trained``).
    results: the run's per-category results in memory (else read from ``<cat>/metrics.json``).
  Returns:
    the analysis dict also written to ``analysis/analysis.json``.
  """
  kwargs = dict(categories=categories, num_images=num_images, sweeps=sweeps,
                num_param_images=num_param_images, method=method, patch_chunk=patch_chunk,
                image_chunk=image_chunk, seed=seed, write=write, verbose=verbose,
                trained=trained, results=results)
  if run is not None or not write:
    return _analyze_run(workdir, **kwargs)
  cfg = study_a_record.load_config(workdir)
  with runrecord.open_run(workdir, cfg, kind=study_a_record.KIND):
    return _analyze_run(workdir, **kwargs)


def _analyze_run(workdir, *, categories, num_images, sweeps, num_param_images, method,
                 patch_chunk, image_chunk, seed, write, verbose, trained, results) -> dict:
  t0 = time.time()
  workdir = Path(workdir)
  if isinstance(sweeps, str):
    sweeps = [s for s in sweeps.split(",") if s.strip()]
  sweep_rows = hyp.load_sweep_rows(sweeps) if sweeps else []
  if trained is None:
    trained = study_a_record.load_trained(workdir, categories)
  t_load = time.time() - t0
  out: dict[str, Any] = {
      "workdir": str(workdir),
      "settings": {"num_images": num_images,
                   "num_param_images": num_images if num_param_images is None else num_param_images,
                   "method": method,
                   "patch_chunk": patch_chunk, "image_chunk": image_chunk, "seed": seed,
                   "sweeps": [str(s) for s in sweeps] if sweeps else [],
                   "backend": jax.default_backend()},
      "rules": hyp.RULES, "categories": {}}
  for cat, tc in trained.items():
    images = tc.dataset.train_images(cat)
    if images is not None and len(images) != len(tc.data.train_feats):
      raise ValueError(f"category {cat!r}: {len(images)} training images but "
                       f"{len(tc.data.train_feats)} feature rows")
    res = analyze_category(tc, images, num_images=num_images, num_param_images=num_param_images,
                           method=method, patch_chunk=patch_chunk, image_chunk=image_chunk,
                           sweep_rows=sweep_rows,
                           run_rows_metrics=_run_metrics_rows(workdir, cat, results), seed=seed)
    out["categories"][cat] = res
    if verbose:
      print(f"[analysis {cat}] " + ", ".join(f"{h.upper()} {res[h]['verdict']}"
                                             for h in ("h1", "h3", "h4", "h7"))
            + f" ({res['seconds']:.0f} s)", flush=True)
  cats = list(out["categories"])
  out["overall"] = {h.upper(): hyp.combine_verdicts([out["categories"][c][h]["verdict"] for c in cats])
                    for h in ("h1", "h3", "h4", "h7")}
  out["sweep_rows"] = len(sweep_rows)
  out["seconds"] = {"load": t_load, "total": time.time() - t0}
  if write:
    write_outputs(workdir, out, sweep_rows)
    out["seconds"]["total"] = time.time() - t0
    _write_json(workdir / "analysis", out)
  return out


PER_PATCH_KEYS = ("nll_BxN", "tail_BxN")
PER_CONDITION_KEYS = ("input_norm_BxN", "param_norm_BxN")


def _write_json(out_dir: Path, analysis: dict) -> None:
  """``analysis.json`` without the per-patch arrays, which go to ``<cat>_per_patch.npz``
  (keys nll_BxN, tail_BxN, image_indices and input/param_norm_BxN_lambda=<λ>)."""
  slim = json.loads(io.to_json(analysis))
  for cat, res in slim["categories"].items():
    h3 = res["h3"]
    arrays = {k: np.asarray(h3.pop(k)) for k in PER_PATCH_KEYS}
    arrays["image_indices"] = np.asarray(h3["image_indices"])
    for cond in h3["conditions"]:
      for k in PER_CONDITION_KEYS:
        arrays[f"{k}_lambda={cond['tail_weight']:g}"] = np.asarray(cond.pop(k), np.float32)
    h3["per_patch_file"] = f"{cat}_per_patch.npz"
    with io.atomic_path(out_dir / f"{cat}_per_patch.npz") as tmp:
      with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
  io.atomic_write_json(out_dir / "analysis.json", slim)


def write_outputs(workdir: Path, analysis: dict, sweep_rows: Sequence[dict] = ()) -> None:
  """Figures, ``analysis.json`` (+ per-patch ``.npz``) and ``report.md`` under
  ``<workdir>/analysis``."""
  from tailjax.analysis import figures
  out_dir = Path(workdir) / "analysis"
  cats = list(analysis["categories"])
  per = analysis["categories"]
  figures.gradient_concentration(out_dir / "gradient_concentration.png", {c: per[c]["h3"] for c in cats})
  figures.latent_calibration(out_dir / "latent_calibration.png", {c: per[c]["h7"] for c in cats})
  figures.topk_dilution(out_dir / "topk_dilution.png", {c: per[c]["h4"] for c in cats})
  figures.tail_location(out_dir / "tail_location.png", {c: per[c]["h1"] for c in cats})
  series, source = _ablation_series(analysis, sweep_rows, cats)
  analysis["ablation"] = {"source": source, "series": series}
  if series:
    figures.tail_weight_ablation(out_dir / "tail_weight_ablation.png", series, source)
  _write_json(out_dir, analysis)
  io.atomic_write_text(out_dir / "report.md", render_report(analysis, Path(workdir)))


# ----------------------------------------------------------------------------
# Markdown: analysis/report.md, one function per section
# ----------------------------------------------------------------------------


def summary_table(analysis: dict) -> list[str]:
  """The hypothesis table: hypothesis | claim | verdict | key evidence | the original
  study's verdict (``study_a_conclusions.hypothesis_table``, as in the run's report.md)."""
  return study_a_conclusions.hypothesis_table(study_a_conclusions.hypothesis_summary(analysis))


def render_report(analysis: dict, workdir: Path) -> str:
  """``analysis/report.md``: the settings, the hypothesis table and its rules, then one
  section per hypothesis, the tail-weight ablation, the examples and the timings."""
  sections = (_header_section(analysis) + _h1_section(analysis) + _h3_section(analysis)
              + _h7_section(analysis) + _h4_section(analysis) + _ablation_section(analysis)
              + _examples_section(analysis, Path(workdir)) + _timing_section(analysis))
  return "\n".join(sections) + "\n"


def _header_section(analysis: dict) -> list[str]:
  s = analysis["settings"]
  cats = list(analysis["categories"])
  first = analysis["categories"][cats[0]]
  ar = first["analysed_row"]
  return ["# Study A: mechanism analyses", "",
          f"Run `{analysis['workdir']}`; categories {', '.join(cats)}. Analysed model: "
          f"**{ar['variant']}** (λ = {ar['tail_weight']:g}, r = {ar['top_k_ratio']:g}), seed "
          f"{ar['seed']}. H1/H4 on all training images; H3 on {first['h3']['n_images_input']} "
          f"training images (input space) and {first['h3']['n_images_param']} of them with exact "
          f"per-patch parameter gradients (`{s['method']}`, patch chunk "
          f"{s['patch_chunk'] or 'default'}); H7 on the normal test images, every variant and "
          f"seed. Backend {s['backend']}; {analysis['seconds']['total']:.0f} s in all. The "
          "original study's values (study note 004) are shown beside ours.",
          "", "## Hypotheses", ""] + summary_table(analysis) + [
          "", "Verdict rules (fixed in `tailjax/analysis/hypotheses.py`, applied as written):", ""
          ] + [f"- **{k}**: {v}" for k, v in analysis["rules"].items()] + [""]


def _h1_section(analysis: dict) -> list[str]:
  cats = analysis["categories"]
  body = [_h1_patch_level_row(c, res["h1"]) for c, res in cats.items()]
  st = ORIGINAL["H1"]
  body.append(["*original study*", st["distance_tail"], st["distance_uniform"], "—", "—",
               st["test_p"], st["sobel_tail"], st["sobel_non_tail"], st["sobel_ratio"],
               st["mw_p"], "—"])
  lines = ["## H1: where are the tail patches?", ""] + reporting.table(
      ["category", "distance to border, tail (mean ± std)", "uniform (exact mean)",
       "on border: tail / uniform", "χ² (df), p", "KS D, p (Monte Carlo)", "Sobel tail",
       "Sobel non-tail", "ratio", "Mann-Whitney p", "AUC"], body)
  lines += ["", "Distances are in patches on the feature grid (0 = border row/column); the "
            "original study's uniform value 4.179 used a different distance definition, so "
            "compare the tests, not the units. Sobel: magnitude of the grayscale image's Sobel "
            "gradient (values in [0, 1]) averaged over each patch's cell. The χ², KS and "
            "Mann-Whitney tests above pool the patches of all images as if independent; they "
            "are **descriptive** (correlated patches inflate their significance). The verdict "
            "uses the image-level tests below.", "",
            "Image level (one number per image: tail mean − non-tail mean; Wilcoxon signed-rank "
            "across images; the verdict's test):", ""]
  lines += reporting.table(
      ["category", "images", "Sobel: median ratio, mean Δ [95 % CI], Wilcoxon p, sign-test p",
       "border distance: mean Δ vs uniform [95 % CI], Wilcoxon p"],
      [_h1_image_level_row(c, res["h1"]) for c, res in cats.items()])
  lines += ["", "Sobel tail / non-tail within the same kind of cell (position held fixed):", ""]
  lines += reporting.table(
      ["category", "border cells: ratio, p (n tail)", "interior cells: ratio, p (n tail)"],
      [[c] + [_stratum_cell((res["h1"].get("sobel_by_stratum") or {}).get(name))
              for name in ("border", "interior")] for c, res in cats.items()])
  return lines + ["", "![tail location](tail_location.png)", ""]


def _h1_patch_level_row(c: str, h1: dict) -> list[str]:
  num, p = reporting.num, reporting.pvalue
  t, sb = h1["distance_test"], h1.get("sobel") or {}
  return [c, f"{h1['distance_tail_mean']:.3f} ± {h1['distance_tail_std']:.3f}",
          f"{h1['distance_uniform_mean']:.3f}",
          f"{100 * h1['border_fraction_tail']:.1f} % / {100 * h1['border_fraction_uniform']:.1f} %",
          f"{num(t['chi2'], '.1f')} ({t['chi2_df']}), {p(t['chi2_p'])}",
          f"{t['ks_d']:.3f}, {p(t['ks_p_mc'])}", num(sb.get("mean_a")), num(sb.get("mean_b")),
          f"{num(sb.get('ratio'), '.3f')}×", p(sb.get("p")), num(sb.get("auc"), ".3f")]


def _h1_image_level_row(c: str, h1: dict) -> list[str]:
  il = h1.get("image_level") or {}
  sb, bd = il.get("sobel"), il.get("border")
  sob = ("—" if not sb else f"{reporting.num(sb['median_ratio'], '.3f')}×, "
         f"{reporting.interval(sb['diff'], digits=4, signed=True)}, {reporting.pvalue(sb['wilcoxon_p'])}, "
         f"{reporting.pvalue(sb['sign_p'])}")
  bor = ("—" if not bd else f"{reporting.interval(bd['diff'], digits=3, signed=True)}, "
         f"{reporting.pvalue(bd['wilcoxon_p'])}")
  return [c, bd["n_images"] if bd else "—", sob, bor]


def _stratum_cell(g: dict | None) -> str:
  return "—" if not g else f"{reporting.num(g['ratio'], '.3f')}×, {reporting.pvalue(g['p'])} ({g['n_a']})"


def _h3_section(analysis: dict) -> list[str]:
  cats = analysis["categories"]
  lines = ["## H3: gradient concentration", "",
           "Per patch i of image b: input space ‖∂L_b/∂x_bi‖ (L_b = Σ_i w_bi NLL_bi, features "
           "before the LayerNorm); parameter space ‖∂(w_bi·NLL_bi)/∂θ‖, exact per patch. Tail "
           "= each image's top-k NLL patches, the same for every λ. Ratio = mean tail / mean "
           "non-tail norm; Gini of each image's N norms, averaged; amplification = "
           "ratio(λ)/ratio(0); tail amp. = tail(λ)/tail(0); share = tail share of the parameter "
           "update ⟨G_T, G⟩/⟨G, G⟩ (k/N if tail patches were typical).", ""]
  body = [row for c, res in cats.items() for row in _h3_rows(c, res["h3"])]
  m, t_ = ORIGINAL["H3"]["mean_only"], ORIGINAL["H3"]["tail_only"]
  body.append(["*original study*", "mean-only (λ=0)", "?", m["tail"], m["non_tail"], m["ratio"],
               m["gini"], "", "", "", ""])
  body.append(["*original study*", "tail-aware (λ=1)", "?", t_["tail"], t_["non_tail"],
               t_["ratio"], t_["gini"], ORIGINAL["H3"]["amplification"], "",
               ORIGINAL["H3"]["theoretical"], ""])
  lines += reporting.table(["category", "condition", "space", "tail gradient", "non-tail", "ratio",
                            "Gini", "amplification", "tail amp.", "N/k", "update share"], body)
  lines += ["", "**Concentration beyond construction (L1).** The loss gives the tail a share "
            "λ + (1−λ)·k/N of its weights; if every patch's gradient were alike, that would be "
            "the tail share of the update. Per image, the measured share of each trained "
            "model's own update (its λ, its top-k) against that null; 95 % t-interval over "
            "images:", ""]
  lines += reporting.table(
      ["category", "model", "λ", "share (mean)", "construction null", "excess [95 % CI]", "p",
       "images"],
      [[c, f"{role}: {v['variant']} seed {v['seed']}", f"{v['tail_weight']:g}",
        f"{v['share']:.3f}", f"{v['null']:.3f}", reporting.interval(v["excess"], signed=True),
        reporting.pvalue(v["excess"]["p"]), v["n_images"]]
       for c, res in cats.items() for role, v in (res.get("l1") or {}).items()])
  return lines + [
      "", "Parameter space is exact arithmetic once the per-patch norms are known: since w is "
      "a constant, ‖∂(w_i NLL_i)/∂θ‖ = w_i ‖∂NLL_i/∂θ‖, so the tail amplification at λ = 1 is "
      "exactly N/k and the non-tail norms vanish (ratio ∞). The measured content is the "
      "unweighted row (are tail patches intrinsically steeper?), the input-space rows (gradient "
      "leaks to neighbours through the 3×3 couplings and the LayerNorm), and the update share, "
      "which counts cancellation between patches. The original study's 49.99× at λ = 1 with a "
      "non-zero non-tail gradient cannot be a parameter-space per-patch norm.", "",
      "![gradient concentration](gradient_concentration.png)", ""]


def _h3_rows(c: str, h3: dict) -> list[list]:
  rows = []
  for cd in h3["conditions"]:
    name = {0.0: "mean-only (λ=0)", 1.0: "tail-only (λ=1)"}.get(
        cd["tail_weight"], f"tail-aware (λ={cd['tail_weight']:g})")
    for space in ("input", "param"):
      st_ = cd[space]
      ratio = "∞ (non-tail w = 0)" if st_["ratio"] is None else f"{st_['ratio']:.2f}×"
      amp = "∞" if st_["amplification"] is None else f"{st_['amplification']:.1f}×"
      share = f"{cd['update']['share']:.3f}" if space == "param" else ""
      rows.append([c, name, space, f"{st_['tail']:.4g}", f"{st_['non_tail']:.4g}", ratio,
                   f"{st_['gini']:.3f}", amp, f"{reporting.num(st_['tail_amplification'], '.1f')}×",
                   f"{h3['theoretical_amplification']:.0f}×", share])
  u = h3["unweighted_param"]
  rows.append([c, "unweighted ‖∂NLL_i/∂θ‖", "param", f"{u['tail']:.4g}", f"{u['non_tail']:.4g}",
               f"{reporting.num(u['ratio'], '.2f')}×", f"{u['gini']:.3f}", "", "", "", ""])
  return rows


def _h7_section(analysis: dict) -> list[str]:
  cats = analysis["categories"]
  body = []
  for c, res in cats.items():
    h7 = res["h7"]
    a = h7["analysed"]
    body.append([c, f"**{h7['analysed_variant']}** seed {a['seed']}", f"{a['mean']:.4f}",
                 f"{a['std']:.4f}", f"{a['qq_corr']:.4f}", f"{a['tail_error']:.4f}",
                 f"{a['ks_p_mean']:.3g}", f"{100 * a['ks_reject_fraction']:.0f} %",
                 f"{a['shapiro_p_mean']:.3g} ({a['shapiro_n']})"])
    for name, bv in h7["by_variant"].items():
      body.append([c, f"{name}, mean ± std over {bv['tail_error']['n']} seeds",
                   f"{bv['mean']['mean']:.4f}",
                   f"{bv['std']['mean']:.4f} ± {reporting.num(bv['std']['std'], '.4f')}",
                   f"{bv['qq_corr']['mean']:.4f} ± {reporting.num(bv['qq_corr']['std'], '.4f')}",
                   f"{bv['tail_error']['mean']:.4f} ± {reporting.num(bv['tail_error']['std'], '.4f')}",
                   f"{bv['ks_p_mean']['mean']:.3g}", "", f"{bv['shapiro_p_mean']['mean']:.3g}"])
  s7 = ORIGINAL["H7"]
  body.append(["*original study*", "(one model)", s7["mean"], s7["std"], s7["qq_corr"],
               s7["tail_error"], s7["ks_p_mean"], "", ""])
  lines = ["## H7: latent calibration (normal test images)", ""] + reporting.table(
      ["category", "variant", "z mean", "z std", "QQ corr", "tail calib. error", "mean KS p",
       "KS reject @5 %", "mean Shapiro p (n)"], body)
  names = list(cats)
  q_by_cat = {c: {e["percentile"]: e for e in cats[c]["h7"]["analysed"]["quantiles"]}
              for c in names}
  rows = []
  for p in hyp.QUANTILE_TABLE_PERCENTILES:
    es = [q_by_cat[c][float(p)] for c in names]
    rows.append([f"{p} %", *(f"{e['empirical']:.3f}" for e in es), f"{es[0]['theoretical']:.3f}",
                 *(f"{e['error']:.3f}" for e in es), s7["quantiles"].get(str(p), "")])
  lines += ["", "Quantiles of the analysed model's z (pooled over dimensions and patches):", ""]
  lines += reporting.table(["percentile", *(f"{c} empirical" for c in names), "theoretical",
                            *(f"{c} error" for c in names), "original study empirical"], rows)
  return lines + ["", "![latent calibration](latent_calibration.png)", ""]


def _h4_section(analysis: dict) -> list[str]:
  lines = ["## H4: top-k dilution", "",
           "Hard set: patches whose NLL under an **independent model** (another seed of the same "
           "variant; the analysed model itself only when the run has one seed, which makes "
           "purity nearly a tautology) exceeds the 98th percentile over all training patches of "
           "the category; chance purity is 2 %. Purity = fraction of the selected top-k patches "
           "that are hard; effective concentration = purity × N/k. Pixel AP from the sweep "
           "(mean ± std over seeds) where given.", ""]
  original = {e["ratio"]: e for e in ORIGINAL["H4"]["rows"]}
  for c, res in analysis["categories"].items():
    h4 = res["h4"]
    perf_by_r = {round(e["top_k_ratio"], 6): e for e in h4["sweep_r_axis"]}
    indep = (f"hard set from seed {h4['hard_set_seed']}" if h4.get("hard_set_seed") is not None
             else "hard set from the analysed model itself (one seed: not independent)")
    body = []
    for e in h4["dilution"]["rows"]:
      pe = perf_by_r.get(round(e["ratio"], 6))
      ap = (f"{100 * pe['mean']:.2f} ± {100 * pe['std']:.2f} (n={pe['n']})"
            if pe and np.isfinite(pe["std"]) else f"{100 * pe['mean']:.2f} (n={pe['n']})"
            if pe else "—")
      sr = original.get(e["ratio"])
      body.append([f"{100 * e['ratio']:g} %", e["k"], f"{e['amplification']:.1f}×",
                   f"{100 * e['purity']:.1f} %", f"{e['effective']:.2f}×",
                   f"{100 * e['recall']:.1f} %", ap,
                   ", ".join(sr[k] for k in ("k", "amplification", "purity", "effective"))
                   if sr else ""])
    lines += [f"**{c}** (sweep λ = {reporting.num(h4['sweep_lambda'], 'g')}; {indep}):", ""]
    lines += reporting.table(["ratio", "k", "amplification", "purity", "effective conc.",
                              "recall of hard set", "pixel AP (sweep)",
                              "original study: k, amp., purity, effective"], body) + [""]
  if not analysis["sweep_rows"]:
    lines += ["No sweep results were given (`--sweeps=<dir with results.json>`), so the "
              "performance side of H4 is untested and its verdict is NOT TESTED.", ""]
  return lines + ["![top-k dilution](topk_dilution.png)", ""]


def _ablation_section(analysis: dict) -> list[str]:
  abl = analysis.get("ablation", {})
  lines = ["## Tail-weight ablation", ""]
  if not abl.get("series"):
    return lines + ["No metrics per λ available.", ""]
  lams = sorted({e["tail_weight"] for ser in abl["series"].values() for e in ser})
  body = []
  for lam in lams:
    cells = []
    for ser in abl["series"].values():
      e = next((x for x in ser if abs(x["tail_weight"] - lam) < 1e-6), None)
      cells.append("—" if e is None else
                   f"{100 * e['mean']:.2f} ± {reporting.num(100 * e['std'], '.2f')} (n={e['n']})")
    body.append([f"{lam:g}", *cells])
  return lines + [f"Source: {abl['source']}.", ""] + reporting.table(
      ["λ", *abl["series"]], body) + ["", "![tail-weight ablation](tail_weight_ablation.png)", ""]


def _examples_section(analysis: dict, workdir: Path) -> list[str]:
  lines = ["## Anomaly-map examples", ""]
  for c in analysis["categories"]:
    if (workdir / c / "examples.png").exists():
      lines += [f"![{c}](../{c}/examples.png)", ""]
  return lines


def _timing_section(analysis: dict) -> list[str]:
  body = [[c, *(f"{res['timings'][k]:.1f} s" for k in ("h1", "h3", "h4", "h7")),
           f"{res['seconds']:.1f} s"] for c, res in analysis["categories"].items()]
  body.append(["loading the run", "", "", "", "", f"{analysis['seconds']['load']:.1f} s"])
  return ["## Timing", ""] + reporting.table(["category", "H1", "H3", "H4", "H7", "total"], body)


def append_to_report(workdir: str | Path, analysis: dict | None = None) -> list[str]:
  """Rewrites ``<workdir>/report.md`` (and ``conclusions.json``, the budget figure) of a
  finished run with ``analysis`` — default: the saved ``analysis/analysis.json`` — as its
  "Mechanism analyses" section and the causal chain's L1 link, in one pass from the run's
  records (``study_a_report.rewrite_report``). Returns the report's lines."""
  workdir = Path(workdir)
  if analysis is None:
    f = workdir / "analysis" / "analysis.json"
    if not f.is_file():
      raise FileNotFoundError(f"{f} not found: run analyze_run({str(workdir)!r}) first")
    analysis = json.loads(f.read_text())
  return study_a_report.rewrite_report(workdir, analysis)
