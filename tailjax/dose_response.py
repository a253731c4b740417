"""Within-category dose–response: does a paired effect grow with a rung covariate?

Setting (study A's difficulty ladder): in each category c the same trained rows are
scored on test sets ("rungs") j = 1..J_c that differ only in defect strength, so every
rung shares the photographs, the draws and the trained seeds. Per category, rung and
seed the input is a paired effect ``Δ_{c,j,s}`` (tail-aware − mean-only, seed s's two
rows on rung j) and a rung covariate ``x_{c,j}`` fixed before any flow is trained (e.g.
PaDiM's image AUROC on the calibration split; never a result of the arms compared,
whose own test-set result would put the outcome on both sides of the regression).

Why two stages and within categories: categories differ in their photographs, defect
generators and mask rules at once, and (by construction of each ladder) in the range of
their covariate. A regression of category-level effects on category-level covariates
mixes "categories with easier defects gain more" with "within a category, easier rungs
gain more"; only the second is a dose–response. The per-category OLS slope is a
contrast within one category (a category's intercept cancels in it), so no
between-category difference can leak in. A mixed model with random intercepts and
slopes would separate the two only with the covariate centred within each category,
and would not take the test-image bootstrap's variance per category; the two-stage
estimate does both with the tested random-effects code (``metaanalysis``).

Stage 1, per category c over the rungs J_c it keeps (``include``):

  ω_j = (x_j − x̄) / S_xx,   S_xx = Σ_j (x_j − x̄)²,   b_{c,s} = Σ_j ω_j Δ_{c,j,s},
  b̂_c = mean_s b_{c,s}  (= the OLS slope of the seed-mean Δ̄_{c,j} on x_j).

Each seed's slope is formed first because a seed's two trained rows are the same on
every rung: a seed's own offset on Δ cancels in its slope, and the seed spread of
``b_{c,s}`` is the seed noise of the slope, correlations across rungs included. The
test-image noise: with bootstrap replicates ``Δ_{c,j,s,r}`` (the same image resample r
on every rung and seed; rungs share their images, so this keeps their correlation),
``b_{c,s,r} = Σ_j ω_j Δ_{c,j,s,r}`` and ``stats.seed_test_interval(b_{c,·}, b_{c,·,·})``
splits the variance of b̂_c into

  g_c = max(se_seed² − se_inter², 0)   (seeds, S_c − 1 df),   t_c = se_test²   (test images).

Without replicates, a per-rung test variance ``test_var_{c,j}`` of Δ̄_{c,j} may be given
instead: ``t_c = Σ_j ω_j² test_var_{c,j}``, which treats rungs as independent (they
share images, and a positive correlation across rungs makes this an over-estimate of a
contrast's variance: conservative). With neither, t_c = 0 (seed noise only).

``pool_seed_variance`` (default): with 3–5 seeds a category's g_c has 2–4 df, and
inverse-variance weights then favour the categories whose variance came out small (see
``metaanalysis.effects_from_seeds``). Pooled, under seed noise independent across rungs
(Var b_{c,s} = σ²/S_xx,c):

  σ̂² = Σ_c (S_c − 1) · S_c · S_xx,c · g_c / Σ_c (S_c − 1),   g_c ← σ̂² / (S_c · S_xx,c).

The slope's variance is ``v_c = g_c + t_c`` and its interval ``b̂_c ± t_ν · √v_c`` with
Welch–Satterthwaite ``ν = v_c² / (g_c² / df_g)`` (df_g = S_c − 1, or Σ_c (S_c − 1)
pooled; ∞ when g_c = 0), as in ``stats.seed_test_interval``.

Stage 2: ``metaanalysis.random_effects(b̂, v)`` (REML τ², HKSJ interval on k − 1 df),
with the prediction interval for a new category's slope and the modified-HKSJ
interval as a sensitivity. Q and I² come from the same v as the estimate.

Verdict (``verdict``), fixed before any run, on the pooled slope μ̂ of k categories:

* k < ``MIN_CATEGORIES``, or no fit: "not estimable";
* HKSJ CI above 0: "grows with detectability" (``GROWS``);
* HKSJ CI below 0: "shrinks with detectability" (``SHRINKS``);
* an equivalence margin m fixed before the run and TOST on (μ̂, SE, k − 1 df) equivalent
  (the 90 % CI inside (−m, m)): "no dose–response" (``FLAT``);
* otherwise "not established" (``NOT_ESTABLISHED``): neither a slope nor its absence
  is shown. Without a margin "no dose–response" can never be concluded.

Relative scale (sensitivity): the same estimator on ``Δ_rel = (tail − mean) / mean``
per seed and replicate (``relative_delta``), so a constant relative gain on a baseline
that rises with the covariate does not read as an absolute dose–response.

Rungs above a clipping limit: the caller passes ``include`` (False = rung left out of
the slope); left-out rungs are listed in the result per category, and a category with
fewer than two kept rungs (or a constant covariate over them) is listed under
``not_estimable`` with the reason, never silently dropped.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import scipy.stats

from tailjax import metaanalysis, metrics, stats

GROWS = "grows with detectability"
SHRINKS = "shrinks with detectability"
FLAT = "no dose–response"
NOT_ESTABLISHED = "not established"
NOT_ESTIMABLE = "not estimable"
VERDICTS = (GROWS, SHRINKS, FLAT, NOT_ESTABLISHED, NOT_ESTIMABLE)
MIN_CATEGORIES = 3


class CategorySlope(NamedTuple):
  """Stage 1 for one category (module docstring)."""
  category: str
  slope: float              # b̂_c, effect units per covariate unit
  var: float                # v_c = g_c + t_c, handed to the meta-analysis
  se: float                 # √v_c
  df: float                 # Welch–Satterthwaite
  ci: tuple[float, float]
  se_seed: float            # √g_c as used (pooled or own)
  se_test: float            # √t_c
  mean_delta: float         # mean of Δ̄_{c,j} over the kept rungs
  x_mean: float
  sxx: float
  rungs: tuple[int, ...]    # kept rungs (indices into the category's rungs)
  excluded: tuple[int, ...]  # rungs left out by ``include``
  slopes_S: tuple[float, ...]   # b_{c,s}


class DoseResponse(NamedTuple):
  """Stage 1 per category, stage 2 pooled, and the verdict (``dose_response``)."""
  scale: str                              # "absolute" or "relative"
  categories: tuple[CategorySlope, ...]   # the estimable ones
  not_estimable: dict                     # category → reason
  excluded: dict                          # category → rungs left out of the slope
  pooled: metaanalysis.PooledEffect | None
  verdict: str
  margin: float | None
  equivalence: metaanalysis.Equivalence | None
  pooled_seed_variance: bool


def _per_category(values, n: int, name: str, optional: bool = False):
  if values is None:
    if optional:
      return [None] * n
    raise ValueError(f"dose_response: {name} is required")
  values = list(values)
  if len(values) != n:
    raise ValueError(f"dose_response: {name} has {len(values)} categories, delta has {n}")
  return values


def _stage_one(name, delta_JxS, x_J, reps_JxSxR, test_var_J, include_J):
  """(row, None), or (the rung lists only, the reason it is not estimable)."""
  d_JxS = np.asarray(delta_JxS, np.float64)
  x_J = np.asarray(x_J, np.float64).reshape(-1)
  if d_JxS.ndim != 2 or d_JxS.shape[0] != x_J.size:
    raise ValueError(f"dose_response: category {name!r}: delta must be [J, S] with J = "
                     f"{x_J.size} rungs (the covariate's length), got shape {d_JxS.shape}")
  keep_J = (np.ones(x_J.size, bool) if include_J is None
            else np.asarray(include_J, bool).reshape(-1))
  if keep_J.size != x_J.size:
    raise ValueError(f"dose_response: category {name!r}: include has {keep_J.size} rungs, "
                     f"x has {x_J.size}")
  if not (np.isfinite(d_JxS[keep_J]).all() and np.isfinite(x_J[keep_J]).all()):
    raise ValueError(f"dose_response: category {name!r}: delta and x must be finite on the "
                     "kept rungs")
  rungs, excluded = np.flatnonzero(keep_J), np.flatnonzero(~keep_J)
  if reps_JxSxR is not None and test_var_J is not None:
    raise ValueError(f"dose_response: category {name!r}: give replicates or test_var, "
                     "not both")
  base = {"rungs": tuple(int(j) for j in rungs), "excluded": tuple(int(j) for j in excluded)}
  if rungs.size < 2:
    return base, f"{rungs.size} rung(s) kept (< 2)"
  if np.ptp(x_J[rungs]) == 0:
    return base, "covariate constant over the kept rungs"
  if d_JxS.shape[1] < 2:
    return base, f"{d_JxS.shape[1]} seed (< 2)"
  s = d_JxS.shape[1]
  xk_J = x_J[rungs]
  xc_J = xk_J - xk_J.mean()
  sxx = float(np.sum(xc_J * xc_J))
  w_J = xc_J / sxx
  slopes_S = w_J @ d_JxS[rungs]
  if reps_JxSxR is not None:
    r_JxSxR = np.asarray(reps_JxSxR, np.float64)
    if r_JxSxR.ndim != 3 or r_JxSxR.shape[:2] != d_JxS.shape:
      raise ValueError(f"dose_response: category {name!r}: replicates must be [J, S, R] "
                       f"= [{d_JxS.shape[0]}, {s}, R], got shape {r_JxSxR.shape}")
    reps_SxR = np.einsum("j,jsr->sr", w_J, r_JxSxR[rungs])
    sti = stats.seed_test_interval(slopes_S, reps_SxR)
    if sti["n_boot"] < 2:
      return base, "fewer than 2 finite bootstrap replicates"
    se_seed, se_inter, se_test = sti["se_seed"], sti["se_interaction"], sti["se_test"]
  else:
    se_seed = float(slopes_S.std(ddof=1) / np.sqrt(s))
    se_inter = 0.0
    if test_var_J is None:
      se_test = 0.0
    else:
      tv_J = np.asarray(test_var_J, np.float64).reshape(-1)
      if tv_J.size != x_J.size or not (np.isfinite(tv_J).all() and (tv_J >= 0).all()):
        raise ValueError(f"dose_response: category {name!r}: test_var must be {x_J.size} "
                         "finite variances >= 0")
      se_test = float(np.sqrt(np.sum(w_J * w_J * tv_J[rungs])))
  return {**base, "category": name, "slope": float(slopes_S.mean()),
          "g": max(se_seed ** 2 - se_inter ** 2, 0.0), "t": se_test ** 2, "n_seeds": s,
          "sxx": sxx, "x_mean": float(xk_J.mean()),
          "mean_delta": float(d_JxS[rungs].mean()), "slopes_S": tuple(map(float, slopes_S))}, None


def dose_response(delta, x, *, replicates=None, test_var=None, include=None,
                  categories: Sequence[str] | None = None, pool_seed_variance: bool = True,
                  margin: float | None = None, method: str = "reml", ci: str = "hksj",
                  alpha: float = 0.05, scale: str = "absolute") -> DoseResponse:
  """Two-stage within-category dose–response of ``delta`` on ``x`` (module docstring).

  Per category (sequences over categories; a ``[C, J, S]`` array works when all
  categories have J rungs and S seeds): ``delta[c]`` ``[J_c, S_c]`` paired effects per
  rung and seed (the same seed index = the same trained rows on every rung);
  ``x[c]`` ``[J_c]`` the pre-treatment rung covariate; optional ``replicates[c]``
  ``[J_c, S_c, R]`` the effect on R bootstrap resamples of the test images (the same
  resamples on every rung and seed), or ``test_var[c]`` ``[J_c]`` a test-image variance
  of each rung's seed-mean effect; optional ``include[c]`` ``[J_c]`` bool (False: rung
  left out, e.g. above the clipping limit); ``categories`` the names. ``margin``: the
  equivalence bound on the pooled slope for the "no dose–response" verdict, in effect
  units per covariate unit, fixed before the run.
  """
  delta = list(delta)
  n = len(delta)
  x = _per_category(x, n, "x")
  replicates = _per_category(replicates, n, "replicates", optional=True)
  test_var = _per_category(test_var, n, "test_var", optional=True)
  include = _per_category(include, n, "include", optional=True)
  names = [str(c) for c in (range(n) if categories is None else categories)]
  if len(names) != n or len(set(names)) != n:
    raise ValueError(f"dose_response: need {n} distinct category names, got {names}")
  if scale not in ("absolute", "relative"):
    raise ValueError(f"dose_response: scale must be 'absolute' or 'relative', got {scale!r}")
  rows, not_estimable, excluded = [], {}, {}
  for c in range(n):
    row, reason = _stage_one(names[c], delta[c], x[c], replicates[c], test_var[c], include[c])
    excluded[names[c]] = row["excluded"]
    if reason is None:
      rows.append(row)
    else:
      not_estimable[names[c]] = reason
  pooled_g = len(rows) > 1 and pool_seed_variance
  if pooled_g:
    df_g = sum(r["n_seeds"] - 1 for r in rows)
    sigma2 = sum((r["n_seeds"] - 1) * r["n_seeds"] * r["sxx"] * r["g"] for r in rows) / df_g
    for r in rows:
      r["g"], r["df_g"] = sigma2 / (r["n_seeds"] * r["sxx"]), df_g
  else:
    for r in rows:
      r["df_g"] = r["n_seeds"] - 1
  slopes = []
  for r in rows:
    var = r["g"] + r["t"]
    df = var * var / (r["g"] ** 2 / r["df_g"]) if r["g"] > 0 else float("inf")
    q = float(scipy.stats.t.ppf(1 - alpha / 2, df) if np.isfinite(df)
              else scipy.stats.norm.ppf(1 - alpha / 2))
    se = float(np.sqrt(var))
    slopes.append(CategorySlope(
        category=r["category"], slope=r["slope"], var=float(var), se=se, df=float(df),
        ci=(r["slope"] - q * se, r["slope"] + q * se), se_seed=float(np.sqrt(r["g"])),
        se_test=float(np.sqrt(r["t"])), mean_delta=r["mean_delta"], x_mean=r["x_mean"],
        sxx=r["sxx"], rungs=r["rungs"], excluded=r["excluded"], slopes_S=r["slopes_S"]))
  for s in slopes:
    if s.var <= 0:
      not_estimable[s.category] = "zero variance (no seed or test-image spread)"
  slopes = [s for s in slopes if s.var > 0]
  pooled = None
  if len(slopes) >= MIN_CATEGORIES:
    pooled = metaanalysis.random_effects([s.slope for s in slopes], [s.var for s in slopes],
                                         method=method, ci=ci, alpha=alpha)
  equivalence = None
  if pooled is not None and margin is not None:
    equivalence = metaanalysis.tost(pooled.mu, pooled.se, _pooled_df(pooled), margin,
                                    alpha=alpha)
  return DoseResponse(scale=scale, categories=tuple(slopes), not_estimable=not_estimable,
                      excluded=excluded, pooled=pooled, verdict=verdict(pooled, margin),
                      margin=margin, equivalence=equivalence, pooled_seed_variance=pooled_g)


def _pooled_df(pooled: metaanalysis.PooledEffect) -> float:
  return float("inf") if pooled.ci_method == "normal" else float(pooled.k - 1)


def verdict(pooled: metaanalysis.PooledEffect | None, margin: float | None = None) -> str:
  """The rule of the module docstring, a pure function of the pooled fit and the margin
  fixed before the run: ``GROWS`` / ``SHRINKS`` when the pooled slope's CI excludes 0,
  ``FLAT`` when TOST on (μ̂, SE, k − 1 df) shows it inside ±margin, else
  ``NOT_ESTABLISHED``; ``NOT_ESTIMABLE`` for no fit or k < ``MIN_CATEGORIES``."""
  if pooled is None or pooled.k < MIN_CATEGORIES or not np.isfinite(pooled.se):
    return NOT_ESTIMABLE
  lo, hi = pooled.ci
  if lo > 0:
    return GROWS
  if hi < 0:
    return SHRINKS
  if margin is not None and metaanalysis.tost(pooled.mu, pooled.se, _pooled_df(pooled),
                                              margin, alpha=pooled.alpha).equivalent:
    return FLAT
  return NOT_ESTABLISHED


def relative_delta(tail, mean):
  """``(tail − mean) / mean`` elementwise (per seed, and per replicate when given the
  replicates): the relative-scale effect. The mean-only arm's value must be > 0."""
  t, m = np.asarray(tail, np.float64), np.asarray(mean, np.float64)
  if t.shape != m.shape:
    raise ValueError(f"relative_delta: tail {t.shape} and mean {m.shape} differ in shape")
  finite = np.isfinite(m)
  if not (m[finite] > 0).all():
    raise ValueError("relative_delta: the mean-only arm's value must be > 0 for a relative "
                     "effect")
  return (t - m) / m


def dose_response_relative(tail, mean, x, *, tail_replicates=None, mean_replicates=None,
                           **kwargs) -> DoseResponse:
  """``dose_response`` on the relative scale: per category ``relative_delta(tail[c],
  mean[c])`` (``[J_c, S_c]`` each arm), and the same of the arms' replicates (both or
  neither, ``[J_c, S_c, R]`` on the same resamples). Other arguments as there."""
  tail, mean = list(tail), list(mean)
  if len(tail) != len(mean):
    raise ValueError(f"dose_response_relative: {len(tail)} tail and {len(mean)} mean categories")
  if (tail_replicates is None) != (mean_replicates is None):
    raise ValueError("dose_response_relative: give both arms' replicates or neither")
  reps = None
  if tail_replicates is not None:
    reps = [relative_delta(a, b) for a, b in zip(tail_replicates, mean_replicates, strict=True)]
  return dose_response([relative_delta(a, b) for a, b in zip(tail, mean)], x,
                       replicates=reps, scale="relative", **kwargs)


# ----------------------------------------------------------------------------
# Per-rung intervals that count the test images
# ----------------------------------------------------------------------------


def paired_interval(treat_S, base_S, treat_SxR=None, base_SxR=None, *,
                    bounds=stats.AUC_DIFF_BOUNDS, confidence: float = 0.95) -> dict:
  """Interval of the mean over seeds of ``treat − base`` (paired by seed), combining the
  seed spread with a paired bootstrap over test images: ``stats.seed_test_interval``
  on ``treat_S − base_S`` with replicates ``treat_SxR − base_SxR`` (both arms on the same
  resamples). Without replicates: the seed t-interval alone (``stats.mean_ci``), marked
  ``n_boot = 0``. ``bounds``: (−1, 1) for a difference of two AUCs / APs, None for an
  unbounded effect (e.g. relative)."""
  d_S = np.asarray(treat_S, np.float64).reshape(-1) - np.asarray(base_S, np.float64).reshape(-1)
  if treat_SxR is None and base_SxR is None:
    return {**stats.mean_ci(d_S, confidence), "n_boot": 0}
  if treat_SxR is None or base_SxR is None:
    raise ValueError("paired_interval: give both arms' replicates or neither")
  t_SxR, b_SxR = np.asarray(treat_SxR, np.float64), np.asarray(base_SxR, np.float64)
  if t_SxR.ndim != 2 or t_SxR.shape != b_SxR.shape or t_SxR.shape[0] != d_S.size:
    raise ValueError(f"paired_interval: replicates must both be [S, R] with S = {d_S.size} "
                     f"seeds, got {t_SxR.shape} and {b_SxR.shape}")
  rep_SxR = t_SxR - b_SxR
  return stats.seed_test_interval(d_S, rep_SxR, confidence, bounds=bounds)


def pixel_ap_replicates(maps_SxNxHxW, masks_NxHxW, weights_RxN, **kwargs):
  """(pixel AP per seed ``[S]``, on every resample ``[S, R]``): one sort per seed's
  maps (``metrics.pixel_ap_resamples``), the same image multiplicities ``weights_RxN``
  for every seed (and for both arms, so their difference is paired)."""
  ones_1xN = np.ones((1, np.shape(masks_NxHxW)[0]))
  obs, reps = [], []
  for maps_NxHxW in maps_SxNxHxW:
    both = metrics.pixel_ap_resamples(maps_NxHxW, masks_NxHxW,
                                      np.concatenate([ones_1xN, weights_RxN]), **kwargs)
    obs.append(both[0])
    reps.append(both[1:])
  return np.asarray(obs), np.stack(reps)


def rung_table(delta, x, *, replicates=None, include=None,
               categories: Sequence[str] | None = None, bounds=stats.AUC_DIFF_BOUNDS,
               confidence: float = 0.95) -> list[dict]:
  """One row per category and rung: the covariate, whether the rung is in the slope, and
  the paired effect's interval (seed spread + test-image bootstrap when ``replicates``
  are given, as ``paired_interval``). Inputs shaped as in ``dose_response``; left-out
  rungs keep their row (``in_slope`` False)."""
  delta = list(delta)
  n = len(delta)
  x = _per_category(x, n, "x")
  replicates = _per_category(replicates, n, "replicates", optional=True)
  include = _per_category(include, n, "include", optional=True)
  names = [str(c) for c in (range(n) if categories is None else categories)]
  out = []
  for c in range(n):
    d_JxS = np.asarray(delta[c], np.float64)
    keep_J = (np.ones(d_JxS.shape[0], bool) if include[c] is None
              else np.asarray(include[c], bool).reshape(-1))
    for j in range(d_JxS.shape[0]):
      if replicates[c] is None:
        iv = {**stats.mean_ci(d_JxS[j], confidence), "n_boot": 0}
      else:
        r_JxSxR = np.asarray(replicates[c], np.float64)
        if r_JxSxR.ndim != 3 or r_JxSxR.shape[:2] != d_JxS.shape:
          raise ValueError(f"rung_table: category {names[c]!r}: replicates must be [J, S, R] "
                           f"= [{d_JxS.shape[0]}, {d_JxS.shape[1]}, R], got {r_JxSxR.shape}")
        iv = stats.seed_test_interval(d_JxS[j], r_JxSxR[j], confidence, bounds=bounds)
      out.append({"category": names[c], "rung": j, "x": float(np.asarray(x[c])[j]),
                  "in_slope": bool(keep_J[j]), **iv})
  return out


__all__ = ["CategorySlope", "DoseResponse", "dose_response", "dose_response_relative",
           "verdict", "relative_delta", "paired_interval", "pixel_ap_replicates",
           "rung_table", "GROWS", "SHRINKS", "FLAT", "NOT_ESTABLISHED", "NOT_ESTIMABLE",
           "VERDICTS", "MIN_CATEGORIES"]
