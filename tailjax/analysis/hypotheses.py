"""Statistics and verdict rules for the original study's hypotheses H1, H3, H4 and H7.

H1 (tail location): are the tail patches (each image's top-k NLL patches) at
  the grid border, or on image edges / texture boundaries?
H3 (gradient concentration): does mean-only training spread the update over
  all patches while the tail-aware loss concentrates it on the tail? (The
  gradients themselves are computed in ``gradients.py``.)
H4 (top-k dilution): does a ratio r above 2 % dilute the concentration
  (amplification N/k × purity) and cost performance?
H7 (latent calibration): does tail training make z closer to N(0, I)?

Every verdict comes from ``RULES`` below: thresholds fixed before looking at
any result, printed verbatim in the report. Evidence a rule needs but that is
missing (no sweep results, a single seed) never counts as support.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from tailjax import losses

SUPPORTED, PARTIAL, NOT_SUPPORTED, NOT_TESTED = "SUPPORTED", "PARTIAL", "NOT SUPPORTED", "NOT TESTED"

H4_RATIOS = (0.01, 0.02, 0.03, 0.05, 0.10, 0.20, 0.50, 1.0)
CALIBRATION_PERCENTILES = tuple(range(1, 100))
TAIL_PERCENTILES = (1, 2, 5, 95, 98, 99)
QUANTILE_TABLE_PERCENTILES = (1, 2, 5, 25, 50, 75, 95, 98, 99)

# Thresholds of the verdict rules. Chosen a priori; do not tune them to a result.
H1_SOBEL_RATIO_MIN = 1.10     # tail patches need ≥ 10 % more edge energy than the rest ...
H1_ALPHA = 0.01               # ... at this Mann-Whitney significance for SUPPORTED
H1_ALPHA_PARTIAL = 0.05       # a significant (p < 0.05) but smaller excess is PARTIAL
H3_SHARE_CONCENTRATED = 0.5   # under the run's λ the tail makes at least half of the update
H4_LARGE_R = 0.10             # "large" ratios: r ≥ 0.10
H4_DILUTION_FACTOR = 2.0      # effective concentration at the run's r ≥ 2 × that at r = 0.10
H4_ALPHA = 0.05               # one-sided Welch t-test, run's r vs the best r ≥ 0.10
H7_QQ_MIN = 0.99              # QQ correlation against N(0, 1) at percentiles 1..99
H7_TAIL_ERROR_MAX = 0.10      # mean |quantile error| at 1, 2, 5, 95, 98, 99 %
H4_HARD_PERCENTILE = 98.0  # H4's hard set: NLL above this percentile of all training patches

RULES = {
    "H1": (f"Content claim (edges / texture boundaries), tested at the IMAGE level: per image, "
           f"the ratio of its tail patches' mean Sobel magnitude to its non-tail patches', then a "
           f"Wilcoxon signed-rank test of the per-image differences across images (each image "
           f"counts once, however many correlated patches it has). SUPPORTED if the median "
           f"per-image ratio ≥ {H1_SOBEL_RATIO_MIN} and p < {H1_ALPHA}; PARTIAL if the mean "
           f"difference is > 0 and p < {H1_ALPHA_PARTIAL}; otherwise NOT SUPPORTED. The patch-level "
           f"Mann-Whitney test and the border distance (per-image, Wilcoxon) are descriptive: "
           f"with zero-padded k×k convolutions, border patches differ for a reason that is the "
           f"model's, not the image's."),
    "H3": (f"Parameter space, tail share of the update ⟨G_T, G⟩/⟨G, G⟩ per image, against the "
           f"share the loss weights alone give (construction null λ + (1−λ)·k/N). SUPPORTED "
           f"(beyond construction) if the run's share is ≥ {H3_SHARE_CONCENTRATED} and its excess "
           f"over the null has a 95 % CI over images above 0; PARTIAL (by construction) if the "
           f"share is ≥ {H3_SHARE_CONCENTRATED} but the excess is not above 0 — the concentration "
           f"is the formula's; otherwise NOT SUPPORTED."),
    "H4": (f"(a) dilution: effective concentration (purity × N/k, purity against the hard set "
           f"of an INDEPENDENT model — another seed of the same variant — above its "
           f"{H4_HARD_PERCENTILE:g}th NLL percentile) at the run's r is ≥ "
           f"{H4_DILUTION_FACTOR}× that at r = {H4_LARGE_R}; (b) performance: mean pixel AP "
           f"(sweep, over seeds) at the run's r exceeds that at every r ≥ {H4_LARGE_R}, and a "
           f"one-sided Welch t-test against the best of them gives p < {H4_ALPHA}. SUPPORTED if "
           f"(a) and (b); PARTIAL if one; NOT SUPPORTED if neither; NOT TESTED without sweep "
           f"results at those r."),
    "H7": (f"(a) QQ correlation ≥ {H7_QQ_MIN} for the tail-aware model; (b) its tail "
           f"calibration error ≤ {H7_TAIL_ERROR_MAX}; (c) it improves on mean-only: lower tail "
           f"error in every seed pair (≥ 2 seeds). SUPPORTED if (a), (b) and (c); PARTIAL if (a) "
           f"or (c); otherwise NOT SUPPORTED."),
    "overall": ("Over categories: the common verdict if all agree, PARTIAL if they differ; "
                "NOT TESTED categories are left out."),
}


# ----------------------------------------------------------------------------
# Generic statistics
# ----------------------------------------------------------------------------


def compare_groups(a, b) -> dict:
  """Means of two samples, their ratio, and the two-sided Mann-Whitney U test.

  ``auc = U / (n_a n_b)`` is the probability that a value from ``a`` exceeds one
  from ``b`` (ties count ½): the test's effect size.
  """
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  res = stats.mannwhitneyu(a, b, alternative="two-sided")
  mb = float(b.mean())
  return {"mean_a": float(a.mean()), "mean_b": mb, "std_a": float(a.std()), "std_b": float(b.std()),
          "ratio": float(a.mean()) / mb if mb != 0 else None, "u": float(res.statistic),
          "p": float(res.pvalue), "auc": float(res.statistic) / (a.size * b.size),
          "n_a": int(a.size), "n_b": int(b.size)}


def _ratio_or_none(a, b):
  return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------
# H1: tail location
# ----------------------------------------------------------------------------


def border_distance_grid(h: int, w: int) -> np.ndarray:
  """d[i, j] = min(i, j, h−1−i, w−1−j): patches to the nearest grid border (0 on it)."""
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, w - 1 - j))


def uniform_border_distance_pmf(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact distribution of the border distance of a patch placed uniformly on an h×w grid,
  by enumerating the grid: (values_D, probabilities_D)."""
  values, counts = np.unique(border_distance_grid(h, w), return_counts=True)
  return values, counts / counts.sum()


def discrete_gof(observed, values, pmf, *, min_expected: float = 5.0, n_mc: int = 4000,
                 seed: int = 0) -> dict:
  """Goodness of fit of integer observations to an exact discrete distribution.

  * χ²: ``scipy.stats.chisquare`` on the counts, after pooling the largest
    values into their lower neighbour until every expected count is
    ≥ ``min_expected`` (the usual validity condition); df = bins − 1.
  * KS on the discrete CDF: D = max_v |F_obs(v) − F(v)|. ``scipy.stats.kstest``
    assumes a continuous F (its p-value is conservative for discrete data), so
    the p-value here is Monte-Carlo: the fraction of ``n_mc`` samples of the
    same size drawn from ``pmf`` whose D is at least as large, (1 + #) / (1 + n_mc).
  Both treat observations as independent draws.
  """
  observed = np.asarray(observed).ravel()
  values = np.asarray(values)
  pmf = np.asarray(pmf, np.float64)
  unknown = np.setdiff1d(np.unique(observed), values)
  if unknown.size:
    raise ValueError(f"observed values {unknown.tolist()} are outside the support {values.tolist()}")
  n = observed.size
  counts = np.array([(observed == v).sum() for v in values], np.float64)
  exp_counts = n * pmf
  obs_b, exp_b = list(counts), list(exp_counts)
  while len(exp_b) > 1 and exp_b[-1] < min_expected:
    o, e = obs_b.pop(), exp_b.pop()
    obs_b[-1] += o
    exp_b[-1] += e
  while len(exp_b) > 1 and exp_b[0] < min_expected:
    o, e = obs_b.pop(0), exp_b.pop(0)
    obs_b[0] += o
    exp_b[0] += e
  if len(exp_b) > 1:
    chi = stats.chisquare(obs_b, exp_b)
    chi2, chi_p = float(chi.statistic), float(chi.pvalue)
  else:
    chi2, chi_p = float("nan"), float("nan")
  cdf = np.cumsum(pmf)
  d = float(np.max(np.abs(np.cumsum(counts) / n - cdf)))
  sims = np.random.default_rng(seed).multinomial(n, pmf, size=n_mc)
  d_sim = np.max(np.abs(np.cumsum(sims, axis=1) / n - cdf[None, :]), axis=1)
  return {"n": int(n), "values": values.tolist(), "observed": counts.tolist(),
          "expected": exp_counts.tolist(), "chi2": chi2, "chi2_df": len(exp_b) - 1, "chi2_p": chi_p,
          "ks_d": d, "ks_p_mc": float((1 + np.sum(d_sim >= d - 1e-12)) / (1 + n_mc)), "ks_n_mc": n_mc}


def patch_cell_means(values_NxSxS: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """Mean of a per-pixel map over each patch's cell of the h×w grid, [N, h, w].

  Cell edges are ``round(linspace(0, S, h + 1))`` (exactly S/h pixels when it divides).
  """
  v = np.asarray(values_NxSxS, np.float64)
  h, w = grid_hw
  ey = np.round(np.linspace(0, v.shape[1], h + 1)).astype(int)
  ex = np.round(np.linspace(0, v.shape[2], w + 1)).astype(int)
  if np.any(np.diff(ey) == 0) or np.any(np.diff(ex) == 0):
    raise ValueError(f"images of {v.shape[1]}×{v.shape[2]} px are smaller than the {h}×{w} grid")
  sums = np.add.reduceat(np.add.reduceat(v, ey[:-1], axis=1), ex[:-1], axis=2)
  return sums / (np.diff(ey)[None, :, None] * np.diff(ex)[None, None, :])


def patch_sobel(images_NxSxSx3: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """Image-gradient magnitude per patch: ``skimage.filters.sobel`` of the grayscale image
  (``skimage.color.rgb2gray``, values in [0, 1]), averaged over each patch cell, [N, h, w]."""
  from skimage import color, filters
  images = np.asarray(images_NxSxSx3)
  gray = color.rgb2gray(images) if images.ndim == 4 else images.astype(np.float64) / 255.0
  edges = np.stack([filters.sobel(g) for g in gray])
  return patch_cell_means(edges, grid_hw)


def tail_location(nll_BxN: np.ndarray, grid_hw: tuple[int, int], top_k_ratio: float,
                  images_BxSxSx3: np.ndarray | None = None, seed: int = 0) -> dict:
  """H1 for one model: where are each image's top-k NLL patches?

  * border distance of every tail patch vs its exact uniform distribution on the
    grid (``discrete_gof``), mean and fraction on the border vs uniform;
  * the Sobel magnitude of tail vs non-tail patch cells (``compare_groups``),
    when the images (in the order of ``nll_BxN``) are given, overall and within
    border (d = 0) and interior (d > 0) cells;
  * how often each grid cell is a tail patch (``tail_count_HxW``).
  """
  from tailjax.analysis import gradients
  nll = np.asarray(nll_BxN)
  h, w = grid_hw
  if nll.shape[1] != h * w:
    raise ValueError(f"nll_BxN has {nll.shape[1]} patches, the grid {h}×{w} has {h * w}")
  tail = gradients.tail_mask(nll, top_k_ratio)
  dist_N = border_distance_grid(h, w).ravel()
  d_tail = np.concatenate([dist_N[t] for t in tail])
  values, pmf = uniform_border_distance_pmf(h, w)
  out = {"grid": [h, w], "k": int(tail[0].sum()), "n_images": int(len(nll)),
         "distance_tail_mean": float(d_tail.mean()), "distance_tail_std": float(d_tail.std()),
         "distance_uniform_mean": float(np.dot(values, pmf)),
         "border_fraction_tail": float(np.mean(d_tail == 0)), "border_fraction_uniform": float(pmf[0]),
         "distance_test": discrete_gof(d_tail, values, pmf, seed=seed),
         "tail_count_HxW": tail.reshape(-1, h, w).sum(0).tolist()}
  if images_BxSxSx3 is not None:
    if len(images_BxSxSx3) != len(nll):
      raise ValueError(f"{len(images_BxSxSx3)} images for {len(nll)} NLL rows")
    sob = patch_sobel(images_BxSxSx3, grid_hw).reshape(len(nll), -1)
    out["sobel"] = compare_groups(sob[tail], sob[~tail])
    # Tail patches crowd the border; comparing within border / interior cells separates
    # image content from grid position.
    at_border = np.broadcast_to(dist_N == 0, tail.shape)
    out["sobel_by_stratum"] = {
        name: (compare_groups(sob[tail & sel], sob[~tail & sel])
               if np.any(tail & sel) and np.any(~tail & sel) else None)
        for name, sel in (("border", at_border), ("interior", ~at_border))}
  return out


# ----------------------------------------------------------------------------
# H7: latent calibration
# ----------------------------------------------------------------------------


def latent_calibration(z_MxC: np.ndarray, *, n_shapiro: int = 500, seed: int = 0) -> dict:
  """How close are latents z (rows = patches of normal images, columns = dimensions) to N(0, I)?

  Pooled over all entries: mean, std, empirical vs theoretical quantiles at
  percentiles 1..99, their Pearson correlation (QQ correlation), the tail
  calibration error mean_p |q̂_p − Φ⁻¹(p)| over p ∈ {1, 2, 5, 95, 98, 99} %, and a
  quantile table. Per dimension: the mean p-value of a one-sample KS test
  against N(0, 1) (``scipy.stats.kstest``) and of Shapiro-Wilk on a random
  subsample of ``n_shapiro`` rows (same rows for every dimension), with the
  fraction of dimensions rejected at 5 %. Patches of one image are
  correlated, so the p-values are descriptive, not exact.
  """
  z = np.asarray(z_MxC, np.float64)
  if z.ndim != 2:
    raise ValueError(f"z must be [M, C], got shape {z.shape}")
  flat = z.ravel()
  pct = np.asarray(CALIBRATION_PERCENTILES, np.float64)
  emp = np.percentile(flat, pct)
  theo = stats.norm.ppf(pct / 100)
  tail_emp = np.percentile(flat, TAIL_PERCENTILES)
  tail_theo = stats.norm.ppf(np.asarray(TAIL_PERCENTILES) / 100)
  ks_p = np.array([stats.kstest(z[:, c], "norm").pvalue for c in range(z.shape[1])])
  rows = np.random.default_rng(seed).choice(len(z), size=min(n_shapiro, len(z)), replace=False)
  sw_p = (np.array([stats.shapiro(z[rows, c]).pvalue for c in range(z.shape[1])])
          if len(rows) >= 3 else np.full(z.shape[1], np.nan))
  table_p = np.asarray(QUANTILE_TABLE_PERCENTILES, np.float64)
  table_emp = np.percentile(flat, table_p)
  table_theo = stats.norm.ppf(table_p / 100)
  return {
      "n": int(flat.size), "n_rows": int(len(z)), "dims": int(z.shape[1]),
      "mean": float(flat.mean()), "std": float(flat.std()),
      "qq_corr": float(stats.pearsonr(theo, emp).statistic),
      "tail_error": float(np.mean(np.abs(tail_emp - tail_theo))),
      "qq_percentiles": pct.tolist(), "qq_empirical": emp.tolist(), "qq_theoretical": theo.tolist(),
      "quantiles": [{"percentile": float(p), "empirical": float(e), "theoretical": float(t),
                     "error": float(abs(e - t))} for p, e, t in zip(table_p, table_emp, table_theo)],
      "ks_p_mean": float(ks_p.mean()), "ks_reject_fraction": float(np.mean(ks_p < 0.05)),
      "shapiro_n": int(len(rows)), "shapiro_p_mean": float(np.nanmean(sw_p)),
      "shapiro_reject_fraction": float(np.mean(sw_p < 0.05)),
  }


# ----------------------------------------------------------------------------
# H4: top-k dilution
# ----------------------------------------------------------------------------


def topk_dilution(nll_BxN: np.ndarray, ratios: Sequence[float] = H4_RATIOS,
                  hard_percentile: float = H4_HARD_PERCENTILE,
                  hard_nll_BxN: np.ndarray | None = None) -> dict:
  """For each r: k, amplification N/k, purity and effective concentration = purity × N/k.

  The top-k of each image come from ``nll_BxN`` (the analysed model). The hard set
  is the patches above the ``hard_percentile``-th percentile of ``hard_nll_BxN`` —
  the NLLs of an *independent* model on the same images (another seed). Without
  it the hard set comes from ``nll_BxN`` itself, and purity is then nearly a
  tautology (the pooled top 2 % and the per-image top-k are the same ranking):
  ``independent`` says which was used. Chance purity is 1 − q/100.
  Purity = fraction of the selected top-k patches (pooled over images) that are
  hard; recall = fraction of the hard patches selected.
  """
  from tailjax.analysis import gradients
  nll = np.asarray(nll_BxN, np.float64)
  ref = nll if hard_nll_BxN is None else np.asarray(hard_nll_BxN, np.float64)
  if ref.shape != nll.shape:
    raise ValueError(f"hard_nll_BxN {ref.shape} must match nll_BxN {nll.shape}")
  n = nll.shape[1]
  threshold = float(np.percentile(ref, hard_percentile))
  hard = ref > threshold
  rows = []
  for r in ratios:
    losses.validate_tail_params(0.0, r, where="topk_dilution.ratios")
    k = int(losses.top_k_count(r, n))
    sel = gradients.tail_mask(nll, r)
    purity = float(hard[sel].mean())
    rows.append({"ratio": float(r), "k": k, "amplification": n / k, "purity": purity,
                 "effective": purity * n / k,
                 "recall": float(hard[sel].sum() / max(hard.sum(), 1))})
  return {"hard_percentile": hard_percentile, "threshold": threshold,
          "hard_fraction": float(hard.mean()), "chance_purity": 1 - hard_percentile / 100,
          "independent": hard_nll_BxN is not None, "n_images": int(len(nll)), "n_patches": n,
          "rows": rows}


# ----------------------------------------------------------------------------
# Sweep results (written by the sweep script; optional)
# ----------------------------------------------------------------------------

SWEEP_KEYS = ("category", "tail_weight", "top_k_ratio", "seed", "metrics")


def load_sweep_rows(paths: Iterable[str | Path]) -> list[dict]:
  """Rows of every ``results.json`` (a file, or a directory holding one); clear errors."""
  rows = []
  for p in paths:
    path = Path(p)
    f = path / "results.json" if path.is_dir() else path
    if not f.is_file():
      raise FileNotFoundError(f"sweep results: {f} not found (--sweeps expects a directory "
                              f"holding results.json)")
    try:
      data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"sweep results: {f} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
      raise ValueError(f"sweep results: {f} must hold {{\"rows\": [...]}}")
    for i, row in enumerate(data["rows"]):
      missing = [k for k in SWEEP_KEYS if k not in row]
      if missing:
        raise ValueError(f"sweep results: {f} rows[{i}] lacks {missing}")
      rows.append({**row, "source": str(f)})
  return rows


def sweep_summary(rows: Sequence[dict], categories: Sequence[str] | None = None,
                  metric: str = "pixel_ap") -> list[dict]:
  """Mean ± std over seeds of ``metric`` per (λ, r), averaged over the categories.

  For each (λ, r, seed) the metric is averaged over the requested categories
  (only seeds that have every requested category count); then mean, std and
  the 95 % t-interval over seeds (``mean_ci``). Only rows of the exact per-patch NLL
  count (``tail_nll`` "exact" or absent): a row ranked by an approximation is another
  loss at the same (λ, r).
  """
  from tailjax.stats import mean_ci
  cats = set(categories) if categories else None
  groups: dict[tuple, dict[int, dict[str, float]]] = {}
  for r in rows:
    if cats is not None and r["category"] not in cats or r.get("tail_nll", "exact") != "exact":
      continue
    if metric not in r["metrics"]:
      raise ValueError(f"sweep results: {r['source']} rows lack metrics[{metric!r}]")
    key = (round(float(r["tail_weight"]), 6), round(float(r["top_k_ratio"]), 6))
    groups.setdefault(key, {}).setdefault(int(r["seed"]), {})[r["category"]] = float(r["metrics"][metric])
  want = cats or {r["category"] for r in rows}
  out = []
  for (lam, ratio), by_seed in sorted(groups.items()):
    vals = [np.mean(list(v.values())) for s, v in sorted(by_seed.items()) if set(v) >= want]
    if vals:
      out.append({"tail_weight": lam, "top_k_ratio": ratio, "metric": metric,
                  "values": [float(v) for v in vals], **mean_ci(vals)})
  return out


def sweep_axis(summary: Sequence[dict], vary: str, fixed_value: float) -> list[dict]:
  """The entries of ``summary`` along one axis (``vary`` = "top_k_ratio" or "tail_weight")
  with the other hyperparameter at ``fixed_value``, sorted by the varied one."""
  other = "tail_weight" if vary == "top_k_ratio" else "top_k_ratio"
  sel = [e for e in summary if abs(e[other] - fixed_value) < 1e-6]
  return sorted(sel, key=lambda e: e[vary])


# ----------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------


def verdict_h1(h1: dict) -> tuple[str, str]:
  s = (h1.get("image_level") or {}).get("sobel")
  if s is None:
    return NOT_TESTED, "no images for the Sobel test"
  p, ratio, d = s["wilcoxon_p"], s["median_ratio"], s["diff"]["mean"]
  evidence = (f"median per-image Sobel ratio {ratio:.3f}×, Wilcoxon p = {p:.3g} over "
              f"{s['n_images']} images ({s['n_positive']} with tail > non-tail)")
  if not np.isfinite(p):
    return NOT_TESTED, evidence
  if ratio >= H1_SOBEL_RATIO_MIN and p < H1_ALPHA and d > 0:
    return SUPPORTED, evidence
  if d > 0 and p < H1_ALPHA_PARTIAL:
    return PARTIAL, evidence
  return NOT_SUPPORTED, evidence


def verdict_h3(l1: dict, run_lambda: float) -> tuple[str, str]:
  """``l1``: ``causal.l1_excess`` of the analysed (tail-aware) model under its own λ."""
  ex = l1["excess"]
  evidence = (f"tail share of the update {l1['share']:.3f} at λ = {run_lambda:g} vs "
              f"{l1['null']:.3f} by construction; excess {ex['mean']:+.3f} "
              f"[{ex['lo']:+.3f}, {ex['hi']:+.3f}] over {l1['n_images']} images")
  if not np.isfinite(l1["share"]):
    return NOT_TESTED, evidence
  if l1["share"] >= H3_SHARE_CONCENTRATED and l1["beyond"]:
    return SUPPORTED, evidence + " (beyond construction)"
  if l1["share"] >= H3_SHARE_CONCENTRATED:
    return PARTIAL, evidence + " (by construction)"
  return NOT_SUPPORTED, evidence


def performance_drop(r_axis: Sequence[dict], run_ratio: float) -> dict | None:
  """Criterion (b) of H4 on a sweep axis over r (entries from ``sweep_axis``); None when the
  sweep lacks the run's r or every r ≥ H4_LARGE_R."""
  at_run = [e for e in r_axis if abs(e["top_k_ratio"] - run_ratio) < 1e-6]
  large = [e for e in r_axis if e["top_k_ratio"] >= H4_LARGE_R - 1e-9]
  if not at_run or not large:
    return None
  a = at_run[0]
  best = max(large, key=lambda e: e["mean"])
  if len(a["values"]) >= 2 and len(best["values"]) >= 2:
    p = float(stats.ttest_ind(a["values"], best["values"], equal_var=False,
                              alternative="greater").pvalue)
  else:
    p = None  # one seed: no test, so no support
  above_all = all(a["mean"] > e["mean"] for e in large)
  return {"run_ratio": run_ratio, "run_mean": a["mean"], "best_large_ratio": best["top_k_ratio"],
          "best_large_mean": best["mean"], "above_all_large": above_all, "p": p,
          "holds": bool(above_all and p is not None and p < H4_ALPHA)}


def verdict_h4(dilution: dict, run_ratio: float, perf: dict | None) -> tuple[str, str]:
  by_r = {round(r["ratio"], 6): r for r in dilution["rows"]}
  run, large = by_r.get(round(run_ratio, 6)), by_r.get(round(H4_LARGE_R, 6))
  if run is None or large is None or run_ratio >= H4_LARGE_R:
    return NOT_TESTED, f"the r grid lacks the run's r = {run_ratio:g} or r = {H4_LARGE_R:g}"
  dil = run["effective"] >= H4_DILUTION_FACTOR * large["effective"]
  evidence = (f"effective concentration {run['effective']:.1f}× (r = {run_ratio:g}) vs "
              f"{large['effective']:.1f}× (r = {H4_LARGE_R:g})")
  if perf is None:
    return NOT_TESTED, evidence + "; no sweep results over r, so the performance side is untested"
  p_txt = "no test (one seed)" if perf["p"] is None else f"p = {perf['p']:.3g}"
  evidence += (f"; pixel AP {100 * perf['run_mean']:.2f} % at r = {run_ratio:g} vs best "
               f"{100 * perf['best_large_mean']:.2f} % at r = {perf['best_large_ratio']:g} ({p_txt})")
  n = int(dil) + int(perf["holds"])
  return (SUPPORTED if n == 2 else PARTIAL if n == 1 else NOT_SUPPORTED), evidence


def verdict_h7(treatment: dict, baseline_errors: Sequence[float] | None,
               treatment_errors: Sequence[float] | None) -> tuple[str, str]:
  """``treatment``: ``latent_calibration`` of the analysed tail-aware model; the error lists:
  tail calibration errors per seed (paired by position) of mean-only and tail-aware."""
  a = treatment["qq_corr"] >= H7_QQ_MIN
  b = treatment["tail_error"] <= H7_TAIL_ERROR_MAX
  c = bool(baseline_errors is not None and treatment_errors is not None
           and len(baseline_errors) >= 2 and len(baseline_errors) == len(treatment_errors)
           and all(t < m for t, m in zip(treatment_errors, baseline_errors)))
  evidence = f"QQ corr {treatment['qq_corr']:.4f}, std {treatment['std']:.3f}, tail error {treatment['tail_error']:.3f}"
  if baseline_errors is not None and treatment_errors is not None:
    evidence += (f"; tail error mean-only {np.mean(baseline_errors):.3f} vs tail-aware "
                 f"{np.mean(treatment_errors):.3f} over {len(treatment_errors)} seed(s)")
  if a and b and c:
    return SUPPORTED, evidence
  if a or c:
    return PARTIAL, evidence
  return NOT_SUPPORTED, evidence


def combine_verdicts(verdicts: Sequence[str]) -> str:
  """Overall verdict over categories (``RULES["overall"]``)."""
  tested = [v for v in verdicts if v != NOT_TESTED]
  if not tested:
    return NOT_TESTED
  return tested[0] if all(v == tested[0] for v in tested) else PARTIAL
