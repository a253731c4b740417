"""Statistics shared by the studies and their reports: intervals of a mean, paired tests
with Holm correction and per-category verdicts, AUC intervals over seeds and test sets."""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean, sample std (ddof 1) and the two-sided t-interval of the mean over seeds.

  With one value the spread is undefined: std, lo and hi are NaN.
  """
  v = np.asarray(values, np.float64).reshape(-1)
  n = int(v.size)
  mean = float(v.mean())
  if n < 2:
    return {"mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
  sd = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n))
  return {"mean": mean, "std": sd, "lo": mean - half, "hi": mean + half, "n": n}


# ----------------------------------------------------------------------------
# Paired differences: tests, multiplicity, heterogeneity
# ----------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm–Bonferroni adjusted p-values (controls the family-wise error rate).

  Sorted ascending p_(1) ≤ … ≤ p_(m): adj_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
  NaN p-values stay NaN and do not count in m.
  """
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  ok = np.isfinite(p)
  m = int(ok.sum())
  if m == 0:
    return out
  idx = np.where(ok)[0][np.argsort(p[ok])]
  running = 0.0
  for rank, i in enumerate(idx):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return out


def paired_test(diffs: Sequence[float]) -> dict:
  """Mean, t-interval and two-sided one-sample t-test p of paired differences."""
  d = np.asarray(diffs, np.float64)
  d = d[np.isfinite(d)]                  # an undefined value (e.g. no interior pixels) drops out
  if d.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "lo": float("nan"), "hi": float("nan"),
            "n": 0, "p": float("nan")}
  ci = mean_ci(d)
  p = float(stats.ttest_1samp(d, 0.0).pvalue) if d.size > 1 and np.std(d) > 0 else (
      float("nan") if d.size < 2 else (0.0 if d.mean() != 0 else 1.0))
  return {**ci, "p": p}


def heterogeneity(per_category: Mapping[str, Sequence[float]],
                  replicates: Mapping[str, np.ndarray] | None = None) -> dict:
  """Do categories disagree beyond seed noise? Cochran's Q on the per-category mean
  paired differences and I² = max(0, (Q − df)/Q). Also the signs of the significant
  categories.

  The within-category variance is the seed variance pooled over the categories,
  ``v_c = s²_pooled / S_c`` with ``s²_pooled = Σ (S_c − 1) s_c² / Σ (S_c − 1)``: the
  variance the random-effects estimate uses (``metaanalysis.effects_from_seeds(...,
  pool_variance=True)``), so that Q, I² and that estimate describe one model. (A
  category's own 3-seed variance, 2 df, is often far too small; weighting by it makes Q
  explode — a true null then reads as I² near 100 %.) Needs ≥ 2 seeds per category.
  With ``replicates`` (per category ``[S, R]``, the differences on bootstrap resamples of
  its test images) each category's test-image variance is added
  (``effects_from_seeds_and_resamples``), as the estimate then does.
  """
  from tailjax import metaanalysis   # numpy/scipy only: no import cycle
  rows = [np.asarray(d, np.float64).ravel() for d in per_category.values()]
  df = len(rows) - 1
  if df < 1 or any(d.size < 2 or not np.isfinite(d).all() for d in rows):   # one category:
    # nothing to be heterogeneous with (Q would be 0 up to rounding, and I² 0/0)
    return {"q": float("nan"), "df": df, "p": float("nan"), "i2": float("nan")}
  if replicates is None:
    m, v = metaanalysis.effects_from_seeds(rows, pool_variance=True)
  else:
    m, v = effects_from_seeds_and_resamples(rows, [replicates[c] for c in per_category],
                                            pool_variance=True)
  w = 1.0 / np.maximum(v, 1e-24)
  pooled = float(np.sum(w * m) / np.sum(w))
  q = float(np.sum(w * (m - pooled) ** 2))
  p = float(stats.chi2.sf(q, df)) if df > 0 else float("nan")
  i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
  return {"q": q, "df": df, "p": p, "i2": i2}


def category_verdicts(per_category: Mapping[str, Sequence[float]], alpha: float = 0.05,
                      replicates: Mapping[str, np.ndarray] | None = None) -> dict:
  """Per-category paired tests with Holm correction, and the pooled reading:
  "better" / "worse" when every significant category agrees in sign (and at least
  one is significant), "mixed" when significant effects of both signs exist,
  "no significant difference" otherwise.

  Without ``replicates`` a category's test is the paired t-test over seeds. With them
  (per category ``[S, R]``: the paired differences on R bootstrap resamples of its test
  images) it is ``seed_test_interval`` (seed spread and test images; interval on the
  logit scale of (−1, 1)) and p = 2·P(T_ν > |mean| / se) on its Welch–Satterthwaite ν."""
  cats = list(per_category)
  tests = {c: (paired_test(per_category[c]) if replicates is None else
               seed_test_test(per_category[c], replicates[c])) for c in cats}
  adj = holm([tests[c]["p"] for c in cats])
  out = {}
  for c, a in zip(cats, adj):
    t = tests[c]
    sign = 0 if not (np.isfinite(a) and a < alpha) else (1 if t["mean"] > 0 else -1)
    out[c] = {**t, "p_holm": float(a), "sign": sign}
  signs = {v["sign"] for v in out.values()} - {0}
  pooled = ("mixed" if signs == {1, -1} else "better" if signs == {1} else
            "worse" if signs == {-1} else "no significant difference")
  return {"categories": out, "pooled": pooled,
          "heterogeneity": heterogeneity(per_category, replicates), "alpha": alpha,
          "test_images": replicates is not None}


def seed_test_test(diffs_S, replicates_SxR) -> dict:
  """``seed_test_interval`` of paired differences (bounds (−1, 1)) with the two-sided p of
  H0: mean = 0, ``2·P(T_ν > |mean| / se)`` (normal when ν = ∞; NaN when se = 0 and
  the mean is 0)."""
  iv = seed_test_interval(diffs_S, replicates_SxR, bounds=AUC_DIFF_BOUNDS)
  m, se, df = iv["mean"], iv["se"], iv["df"]
  if not (np.isfinite(m) and np.isfinite(se)):
    p = float("nan")
  elif se == 0:
    p = 0.0 if m != 0 else float("nan")
  else:
    z = abs(m) / se
    p = float(2 * (stats.t.sf(z, df) if np.isfinite(df) else stats.norm.sf(z)))
  return {**iv, "p": p}


# ----------------------------------------------------------------------------
# AUC with uncertainty from the test set (cluster bootstrap) and from seeds
# ----------------------------------------------------------------------------


# The ranges of an AUC (or a share) and of a paired difference of two: the
# intervals are built on their logit scale (``seed_test_interval``).
AUC_BOUNDS = (0.0, 1.0)
AUC_DIFF_BOUNDS = (-1.0, 1.0)


class AucCounts(NamedTuple):
  """Pair counts of an AUC, aggregated by cluster (e.g. bag).

  ``pairs_KxK[k, l] = Σ_{i∈k, y_i=1} Σ_{j∈l, y_j=0} H(s_i − s_j)`` with
  ``H(u) = 1 (u > 0), ½ (u = 0), 0 (u < 0)``; ``pos_K`` / ``neg_K`` count
  the positives / negatives of each cluster.
  """
  pairs_KxK: np.ndarray
  pos_K: np.ndarray
  neg_K: np.ndarray


def _segment_sum(x_PxQ: np.ndarray, seg_P: np.ndarray, k: int) -> np.ndarray:
  """Sums the rows of ``x`` by segment id: ``[k, Q]``."""
  out = np.zeros((k,) + x_PxQ.shape[1:], np.float64)
  if len(seg_P) == 0:
    return out
  order = np.argsort(seg_P, kind="stable")
  ids, starts = np.unique(seg_P[order], return_index=True)
  out[ids] = np.add.reduceat(x_PxQ[order], starts, axis=0)
  return out


def auc_pair_counts(scores_N, positive_N, cluster_N=None, n_clusters: int | None = None) -> AucCounts:
  """``AucCounts`` of scores against binary labels; every instance its own
  cluster when ``cluster_N`` is None. O(P·Q) for P positives and Q negatives."""
  s_N = np.asarray(scores_N, np.float64).reshape(-1)
  y_N = np.asarray(positive_N).reshape(-1) > 0
  if s_N.shape != y_N.shape:
    raise ValueError(f"auc_pair_counts: {s_N.shape[0]} scores but {y_N.shape[0]} labels")
  c_N = np.arange(len(s_N)) if cluster_N is None else np.asarray(cluster_N, np.int64).reshape(-1)
  k = int(c_N.max(initial=-1) + 1) if n_clusters is None else int(n_clusters)
  sp, sn = s_N[y_N], s_N[~y_N]
  h_PxQ = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
  by_pos_KxQ = _segment_sum(h_PxQ, c_N[y_N], k)
  pairs_KxK = _segment_sum(by_pos_KxQ.T, c_N[~y_N], k).T
  return AucCounts(pairs_KxK, np.bincount(c_N[y_N], minlength=k).astype(np.float64),
                   np.bincount(c_N[~y_N], minlength=k).astype(np.float64))


def weighted_auc(counts: AucCounts, weights_RxK=None):
  """AUC of the data with cluster k repeated ``w_k`` times:
  ``AUC(w) = wᵀ P w / ((w·pos)(w·neg))``; a float for ``weights_RxK=None``
  (all ones), else ``[R]``. NaN where a class is absent. For many calls, hold
  ``threadpoolctl.threadpool_limits(1, "blas")`` (see ``auc_interval``)."""
  single = weights_RxK is None
  w_RxK = np.ones((1, len(counts.pos_K))) if single else np.asarray(weights_RxK, np.float64)
  rows, cols = np.flatnonzero(counts.pos_K > 0), np.flatnonzero(counts.neg_K > 0)
  num_R = np.sum((w_RxK[:, rows] @ counts.pairs_KxK[np.ix_(rows, cols)]) * w_RxK[:, cols], axis=1)
  den_R = (w_RxK @ counts.pos_K) * (w_RxK @ counts.neg_K)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc_R = np.where(den_R > 0, num_R / np.where(den_R > 0, den_R, 1.0), np.nan)
  return float(auc_R[0]) if single else auc_R


def bootstrap_weights(strata_K, n_boot: int, seed: int) -> np.ndarray:
  """Cluster-bootstrap multiplicities ``[n_boot, K]``: within each stratum,
  as many clusters as it holds are drawn with replacement (stratifying by the
  bag label keeps the test set's class balance fixed, as its design does)."""
  strata_K = np.asarray(strata_K).reshape(-1)
  rng = np.random.default_rng(seed)
  w_RxK = np.zeros((int(n_boot), len(strata_K)), np.float64)
  for s in np.unique(strata_K):
    idx = np.flatnonzero(strata_K == s)
    w_RxK[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=int(n_boot))
  return w_RxK


def _bounded_interval(mean: float, se: float, q: float, bounds) -> tuple[float, float]:
  """``mean ± q·se`` on the logit scale of ``bounds = (a, b)``, mapped back (None: raw scale).

  With ``p = (x̄ − a)/(b − a)`` and ``u = logit p``, the delta method gives
  ``se_u = se / ((b − a)·p·(1 − p))``; the interval is ``a + (b − a)·expit(u ± q·se_u)``,
  inside (a, b) whatever se is, and nearly ``x̄ ± q·se`` when x̄ is far from a bound. A
  mean on a bound with se = 0 (e.g. every seed's AUC is 1, and so is every resample's)
  gives ``[x̄, x̄]``.
  """
  if not (np.isfinite(mean) and np.isfinite(se)):
    return float("nan"), float("nan")
  if se == 0 or q == 0:
    return mean, mean
  if bounds is None:
    return mean - q * se, mean + q * se
  a, b = (float(v) for v in bounds)
  p = float(np.clip((mean - a) / (b - a), 1e-12, 1 - 1e-12))
  u, se_u = np.log(p / (1 - p)), se / ((b - a) * p * (1 - p))
  expit = lambda z: float(0.5 * (1 + np.tanh(z / 2)))   # = 1/(1+e^-z), no overflow
  return a + (b - a) * expit(u - q * se_u), a + (b - a) * expit(u + q * se_u)


def seed_test_interval(values_S, replicates_SxR, confidence: float = 0.95, *,
                       bounds: tuple[float, float] | None = None) -> dict:
  """Interval for the mean over seeds of a statistic that also varies with the test set.

  ``values_S``: the statistic of each seed on the observed test set;
  ``replicates_SxR``: the same on R bootstrap resamples of the test set (the
  same resamples for every seed); ``bounds``: the statistic's range, (0, 1) for an
  AUC or a share, (−1, 1) for a difference of two (None: unbounded).

  Model: seed s on a test set scores ``v_s = θ + a_s + b + c_s`` — a_s the seed's
  own effect (variance σ_a²), b the test set's effect shared by every seed (σ_b²),
  c_s the seed × test-set interaction (σ_c²). The seed mean x̄ has
  ``Var x̄ = σ_a²/S + σ_b² + σ_c²/S``. The estimates, with ``r̄_r = mean_s
  replicates[s, r]`` and ``d_sr = replicates[s, r] − r̄_r``:

  * ``se_test² = var_r(r̄_r)`` estimates ``σ_b² + σ_c²/S`` (the test set's whole share);
  * ``se_seed² = var(values_S)/S`` estimates ``(σ_a² + σ_c²)/S``: the seed spread on
    one test set holds the interaction too;
  * ``se_inter² = Σ_s var_r(d_s·) / (S − 1) / S`` estimates ``σ_c²/S`` (the
    resamples' seed-to-seed deviations, which carry no a_s);
  * ``se² = max(se_seed² − se_inter², 0) + se_test²``: each component once.

  Degrees of freedom by Welch–Satterthwaite with the seed component
  ``g = max(se_seed² − se_inter², 0)`` as the only estimated-with-few-df term,
  ``ν = se⁴ / (g² / (S − 1))`` (∞, a normal quantile, when g = 0). The interval is
  ``x̄ ± t_ν·se`` on the logit scale of ``bounds`` (``_bounded_interval``), so an AUC
  interval never leaves [0, 1]. ``seed_ci`` (seeds alone: se_seed, S − 1 df) and
  ``test_ci`` (test set alone: se_test, normal) are built the same way, so with no
  seed spread the interval is ``test_ci`` and with no test-set noise it is ``seed_ci``.
  """
  v_S = np.asarray(values_S, np.float64).reshape(-1)
  rep_SxR = np.asarray(replicates_SxR, np.float64).reshape(len(v_S), -1)
  s = len(v_S)
  mean = float(v_S.mean())
  rep_SxR = rep_SxR[:, np.isfinite(rep_SxR).all(0)]   # a resample missing a class has no AUC
  r = rep_SxR.shape[1]
  se_seed = float(v_S.std(ddof=1) / np.sqrt(s)) if s > 1 else 0.0
  rep_R = rep_SxR.mean(0)
  se_test = float(rep_R.std(ddof=1)) if r > 1 else float("nan")
  if s > 1 and r > 1:
    se_inter = float(np.sqrt((rep_SxR - rep_R).var(axis=1, ddof=1).sum() / (s - 1) / s))
  else:
    se_inter = 0.0
  seed_var = max(se_seed ** 2 - se_inter ** 2, 0.0)
  se = float(np.sqrt(seed_var + se_test ** 2))
  df = float(se ** 4 / (seed_var ** 2 / (s - 1))) if seed_var > 0 else float("inf")
  z = float(stats.norm.ppf(0.5 + confidence / 2))
  q = float(stats.t.ppf(0.5 + confidence / 2, df)) if np.isfinite(df) else z
  lo, hi = _bounded_interval(mean, se, q, bounds)
  if s > 1:
    q_seed = float(stats.t.ppf(0.5 + confidence / 2, s - 1))
    s_lo, s_hi = _bounded_interval(mean, se_seed, q_seed, bounds)
    seed_ci = {"mean": mean, "std": float(v_S.std(ddof=1)), "lo": s_lo, "hi": s_hi, "n": s}
  else:
    seed_ci = {"mean": mean, "lo": float("nan"), "hi": float("nan")}
  t_lo, t_hi = _bounded_interval(mean, se_test, z, bounds)
  return {"mean": mean, "lo": lo, "hi": hi, "se": se, "se_seed": se_seed, "se_test": se_test,
          "se_interaction": se_inter, "df": df, "n_seeds": s, "n_boot": int(r),
          "bounds": None if bounds is None else [float(b) for b in bounds],
          "seed_ci": seed_ci, "test_ci": {"mean": mean, "lo": t_lo, "hi": t_hi},
          "values": v_S.tolist()}


def effects_from_seeds_and_resamples(diffs_KxS, reps_KxSxR, pool_variance: bool = True
                                     ) -> tuple[np.ndarray, np.ndarray]:
  """``metaanalysis.effects_from_seeds`` with the test set's sampling noise counted too.

  Per category i: per-seed differences ``d_is`` on the observed test set and ``r_isr`` on
  R bootstrap resamples of its test images (the same resamples for both arms and every
  seed). ``stats.seed_test_interval`` splits the variance of ``y_i = mean_s d_is`` into a
  seed part ``g_i = max(se_seed² − se_interaction², 0)`` and a test-image part
  ``t_i = se_test²``; ``v_i = g_i + t_i``. ``pool_variance``: the seed part is pooled
  over categories as in ``metaanalysis.effects_from_seeds``
  (``σ̂² = Σ (S_i − 1) S_i g_i / Σ (S_i − 1)``, ``g_i ← σ̂² / S_i``); the test part stays
  each category's own (its images are its own).
  """
  rows = [np.asarray(d, np.float64).ravel() for d in diffs_KxS]
  reps = [np.asarray(r, np.float64) for r in reps_KxSxR]
  if len(reps) != len(rows):
    raise ValueError(f"{len(rows)} categories of differences but {len(reps)} of resamples")
  bad = [i for i, d in enumerate(rows) if len(d) < 2 or not np.isfinite(d).all()]
  if bad:
    raise ValueError(f"categories {bad}: need >= 2 finite per-seed differences each")
  parts = [seed_test_interval(d, r) for d, r in zip(rows, reps)]
  g = np.array([max(p["se_seed"] ** 2 - p["se_interaction"] ** 2, 0.0) for p in parts])
  t = np.array([p["se_test"] ** 2 if np.isfinite(p["se_test"]) else 0.0 for p in parts])
  n = np.array([len(d) for d in rows], np.float64)
  if pool_variance:
    g = np.full_like(g, np.sum((n - 1) * n * g) / np.sum(n - 1)) / n
  return np.array([d.mean() for d in rows]), g + t



def auc_interval(scores_SxN, positive_N, *, minus_SxN=None, cluster_N=None, strata_K=None,
                 weights_RxK=None, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
  """Mean AUC over seeds (or a paired difference) with seed + test-set uncertainty.

  ``scores_SxN``: one row of scores per seed (a 1-D array is one seed);
  ``minus_SxN``: optional second arm scored on the same test set, subtracted
  seed by seed (paired; a single row is shared by every seed, e.g. a
  no-learning baseline). The test set is resampled by clusters
  (``cluster_N``, default: each item alone) within strata (``strata_K``,
  default: the label of each cluster when clusters are single items, else
  one stratum); pass ``weights_RxK`` to share resamples across calls. See
  ``seed_test_interval`` for the interval (inside [0, 1] for an AUC, [−1, 1] for a
  difference). BLAS runs single-threaded here:
  these are many small products, which a multi-threaded BLAS on a busy
  machine slows down by orders of magnitude.
  """
  from threadpoolctl import threadpool_limits  # installed with scikit-learn

  with threadpool_limits(1, user_api="blas"):
    return _auc_interval(scores_SxN, positive_N, minus_SxN, cluster_N, strata_K, weights_RxK, n_boot, seed,
                         confidence)


def _auc_interval(scores_SxN, positive_N, minus_SxN, cluster_N, strata_K, weights_RxK, n_boot, seed,
                  confidence) -> dict:
  a_SxN = np.atleast_2d(np.asarray(scores_SxN, np.float64))
  y_N = np.asarray(positive_N).reshape(-1) > 0
  c_N = np.arange(len(y_N)) if cluster_N is None else np.asarray(cluster_N, np.int64)
  k = int(c_N.max() + 1)
  if weights_RxK is None:
    if strata_K is None:
      strata_K = y_N.astype(np.int64) if cluster_N is None else np.zeros(k, np.int64)
    weights_RxK = bootstrap_weights(strata_K, n_boot, seed)

  def arm(x_SxN):
    counts = [auc_pair_counts(x_N, y_N, c_N, k) for x_N in x_SxN]
    return (np.array([weighted_auc(c) for c in counts]),
            np.stack([weighted_auc(c, weights_RxK) for c in counts]))

  v_S, rep_SxR = arm(a_SxN)
  if minus_SxN is None:
    return seed_test_interval(v_S, rep_SxR, confidence, bounds=AUC_BOUNDS)
  b_SxN = np.atleast_2d(np.asarray(minus_SxN, np.float64))
  if len(b_SxN) not in (1, len(a_SxN)):
    raise ValueError(f"auc_interval: minus has {len(b_SxN)} rows, scores {len(a_SxN)}")
  bv_S, brep_SxR = arm(b_SxN)
  return seed_test_interval(v_S - bv_S, rep_SxR - brep_SxR, confidence, bounds=AUC_DIFF_BOUNDS)


def linear_combination_interval(cis, coefs, confidence: float = 0.95) -> dict:
  """Interval of ``Σ_i c_i θ_i`` from independent estimates (e.g. different test
  sets): ``mean = Σ c_i m_i``, ``se = √(Σ c_i² se_i²)``, normal interval.
  Each ``ci`` needs ``mean`` and ``se`` (as ``seed_test_interval`` returns)."""
  m = float(sum(c * ci["mean"] for c, ci in zip(coefs, cis)))
  se = float(np.sqrt(sum((c * ci["se"]) ** 2 for c, ci in zip(coefs, cis))))
  z = float(stats.norm.ppf(0.5 + confidence / 2))
  return {"mean": m, "lo": m - z * se, "hi": m + z * se, "se": se}
