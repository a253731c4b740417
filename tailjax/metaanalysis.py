"""Random-effects meta-analysis and meta-regression over categories, prediction
intervals for a new category, and equivalence tests.

Each category i contributes an effect estimate ``y_i`` (e.g. tail − mean pixel AP,
averaged over seeds) with a within-category sampling variance ``v_i`` (e.g. the
seeds' variance / number of seeds), treated as known. The random-effects model is

  y_i = x_i^T β + u_i + e_i,   u_i ~ N(0, τ²),   e_i ~ N(0, v_i),

with ``x_i = 1`` (pooled effect, β = μ) or ``x_i = (1, covariate_i)`` (meta-regression:
intercept and slope). For a given τ² the estimate is weighted least squares with
weights ``w_i = 1 / (v_i + τ²)``:

  β̂(τ²) = (X^T W X)^{-1} X^T W y,   Cov_normal(β̂) = (X^T W X)^{-1}.

τ² estimators (``method``):

* ``"dl"`` — method of moments: DerSimonian–Laird (1986) for the pooled effect, its
  generalisation to regression (Raudenbush 2009) otherwise. With fixed-effect weights
  ``a_i = 1/v_i``, ``A = diag(a)`` and ``P = A − A X (X^T A X)^{-1} X^T A``,
  ``Q_E = y^T P y`` (Cochran's Q for p = 1) and

    τ̂²_DL = max(0, (Q_E − (k − p)) / tr(P)),
    tr(P) = Σ a_i − tr((X^T A X)^{-1} X^T A² X)   (= Σa − Σa²/Σa for p = 1).

* ``"reml"`` — restricted maximum likelihood: τ̂² maximises over τ² ≥ 0

    ℓ_R(τ²) = −½ Σ log(v_i + τ²) − ½ log det(X^T W X) − ½ (y − X β̂)^T W (y − X β̂),

  found with ``scipy.optimize.minimize_scalar`` (bounded Brent) on [0, U], U = 10·(the
  sample variance of y + max v), far above any τ² the data support (the result is
  checked against a brute-force grid in the tests); the boundary τ² = 0 is taken when
  it scores at least as well. scipy has no random-effects meta-analysis (statsmodels'
  ``combine_effects`` is not a dependency here), hence these few lines.

Intervals for β (``ci``):

* ``"hksj"`` (default) — Hartung–Knapp–Sidik–Jonkman: ``Cov = q · (X^T W X)^{-1}`` with
  ``q = (y − Xβ̂)^T W (y − Xβ̂) / (k − p)`` and t quantiles on k − p degrees of freedom
  (the unmodified form, as metafor's ``test="knha"``; ``q`` may be < 1). With few
  categories (k = 8 here) the normal interval below under-covers; HKSJ keeps near
  nominal coverage (tested).
* ``"hksj_modified"`` — the same with ``q`` replaced by ``max(1, q)`` (Röver, Knapp &
  Friede 2015; metafor's ``test="adhoc"``): never narrower than the Wald interval on t
  quantiles. Use it when the within-category variances are themselves estimated from
  few seeds: weights ``1 / (v̂_i + τ̂²)`` then favour the categories whose variance was
  underestimated, and the unmodified interval rejects a true null 10–15 % of the time
  at nominal 5 % (6 categories × 4 seeds; 9 × 3), the modified one 5–7 % (tested).
* ``"normal"`` — Wald: ``Cov = (X^T W X)^{-1}``, normal quantiles.

τ² gets a Q-profile interval (Viechtbauer 2007): the τ² at which the generalised
``Q(τ²) = (y − Xβ̂(τ²))^T W(τ²) (y − Xβ̂(τ²))`` (decreasing in τ²) equals the
χ²_{k−p} quantiles 1 − α/2 (lower end) and α/2 (upper end), clipped at 0.
Heterogeneity: Cochran's ``Q_E`` with its χ²_{k−p} p-value, and
``I² = τ̂² / (τ̂² + s̃²)`` with the typical within-category variance
``s̃² = (k − p) / tr(P)`` (Higgins–Thompson; equal to ``(Q − df)/Q`` under DL).
Q, I², τ̂² and the weights are all functions of the one ``v_K`` passed in: report Q and
I² from the same fit as the estimate. A Q computed on other variances (e.g. each
category's own few-seed variance beside an estimate on the pooled one) measures a
different model; with 3 seeds a category's own variance is often tiny, which inflates
Q far beyond its df when the pooled-variance fit sees little heterogeneity.

Prediction interval for the true effect of a new category (Higgins, Thompson &
Spiegelhalter 2009; Riley, Higgins & Deeks 2011): at a design row ``x₀`` (``x₀ = 1``
for the pooled effect),

  x₀ᵀβ̂ ± t_{k−p−1, 1−α/2} · sqrt(τ̂² + x₀ᵀ Cov(β̂) x₀),

with ``Cov(β̂)`` the covariance of the chosen interval (HKSJ-scaled for ``"hksj"``). For
the pooled effect that is ``μ̂ ± t_{k−2} · sqrt(τ̂² + SE(μ̂)²)``. Why k − p − 1 degrees
of freedom, one fewer than the CI's k − p: τ² is estimated too, and the plug-in ``τ̂²``
ignores its uncertainty; the heavier t tail pays for it (HTS's argument; with k = 5
categories t_{3} = 3.18 against t_{4} = 2.78). Needs k ≥ p + 2 (NaN below). This is
metafor's ``predict(rma(yi, vi, method="REML", test="knha"), pi.type="Riley")`` (its
``pi.ddf = k − p − (p + 1) + p``, its ``pi.se = sqrt(vpred + τ²)`` with ``vpred`` from
the Knapp–Hartung covariance); metafor's default ``pi.type`` takes the CI's own
quantile instead (t_{k−p} under ``test="knha"``, z under ``test="z"``), narrower.

Sensitivity: every fit also carries the modified-HKSJ interval (``ci_modified``) and the
HKSJ scale ``q`` (``hksj_scale``), whatever ``ci`` chose: when ``q < 1`` (categories
agree more than their variances say) the unmodified HKSJ interval is narrower than the
Wald one on t quantiles; with few categories (k ≤ 4) report both.

Equivalence: ``tost`` (two one-sided tests) of an estimate with its SE and df, e.g. a
pooled effect on k − 1 df or a mean of paired seed-level differences (``tost_paired``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.stats

METHODS = ("dl", "reml")
CI_METHODS = ("hksj", "hksj_modified", "normal")


class PooledEffect(NamedTuple):
  """Random-effects pooled effect μ (``random_effects``)."""
  mu: float
  se: float
  ci: tuple[float, float]
  p_value: float          # two-sided, H0: μ = 0 (t on k − 1 df for HKSJ, normal otherwise)
  tau2: float
  tau2_ci: tuple[float, float]   # Q-profile
  q: float                # Cochran's Q
  q_df: int
  q_p_value: float
  i2: float               # in [0, 1]
  k: int
  method: str
  ci_method: str
  weights_K: np.ndarray   # 1 / (v_i + τ̂²), normalised to sum to 1
  pi: tuple[float, float] = (float("nan"), float("nan"))   # for a new category (HTS)
  pi_df: int = 0          # k − 2 (module docstring)
  ci_modified: tuple[float, float] = (float("nan"), float("nan"))   # modified HKSJ
  hksj_scale: float = float("nan")   # q = Σ w (y − μ̂)² / (k − 1)
  alpha: float = 0.05


class MetaRegression(NamedTuple):
  """Random-effects meta-regression ``y = intercept + slope · x`` (``meta_regression``)."""
  intercept: float
  slope: float
  se_intercept: float
  se_slope: float
  ci_intercept: tuple[float, float]
  ci_slope: tuple[float, float]
  p_slope: float          # two-sided, H0: slope = 0
  tau2: float             # residual between-category variance
  tau2_ci: tuple[float, float]
  q_e: float              # residual heterogeneity Q_E on k − 2 df
  q_df: int
  q_p_value: float
  i2: float               # residual I²
  k: int
  method: str
  ci_method: str
  cov: np.ndarray | None = None   # [2, 2] Cov(intercept, slope) of the chosen interval
  ci_slope_modified: tuple[float, float] = (float("nan"), float("nan"))   # modified HKSJ
  hksj_scale: float = float("nan")
  alpha: float = 0.05


class Prediction(NamedTuple):
  """A meta-regression's mean effect at a covariate value (``predict``): CI for the
  mean, prediction interval for a new category's true effect there."""
  x: float
  mean: float
  se: float
  ci: tuple[float, float]
  pi: tuple[float, float]
  pi_df: int


# ----------------------------------------------------------------------------
# Shared pieces (any design X: the pooled effect is X = 1)
# ----------------------------------------------------------------------------


def _check(y_K, v_K, x_K=None, *, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  y = np.asarray(y_K, np.float64)
  v = np.asarray(v_K, np.float64)
  if y.ndim != 1 or v.shape != y.shape:
    raise ValueError(f"effects y and variances v must be 1-D of equal length, got shapes "
                     f"{y.shape} and {v.shape}")
  if not (np.isfinite(y).all() and np.isfinite(v).all()):
    raise ValueError("effects y and variances v must be finite (a category with NaN/Inf)")
  if (v <= 0).any():
    raise ValueError(f"within-category variances v must be > 0, got min {v.min():g} "
                     f"(category {int(np.argmin(v))})")
  if len(y) < p + 1:
    raise ValueError(f"need at least {p + 1} categories for {p} coefficient(s), got {len(y)}")
  cols = [np.ones_like(y)]
  if x_K is not None:
    x = np.asarray(x_K, np.float64)
    if x.shape != y.shape or not np.isfinite(x).all():
      raise ValueError(f"covariate x must be finite and of shape {y.shape}, got {x.shape}")
    if np.ptp(x) == 0:
      raise ValueError("covariate x is constant across categories: the slope is not identified")
    cols.append(x)
  return y, v, np.stack(cols, axis=1)


def _wls(y_K, v_K, X_KxP, tau2: float):
  """β̂, (X^T W X)^{-1} and the weighted residual sum (y − Xβ̂)^T W (y − Xβ̂) at τ²."""
  w_K = 1.0 / (v_K + tau2)
  xtwx_PxP = X_KxP.T @ (w_K[:, None] * X_KxP)
  inv_PxP = np.linalg.inv(xtwx_PxP)
  beta_P = inv_PxP @ (X_KxP.T @ (w_K * y_K))
  r_K = y_K - X_KxP @ beta_P
  return beta_P, inv_PxP, float(np.sum(w_K * r_K * r_K)), w_K


def _arrays(y_K, v_K, X_KxP=None):
  y = np.asarray(y_K, np.float64)
  v = np.asarray(v_K, np.float64)
  X = np.ones((len(y), 1)) if X_KxP is None else np.asarray(X_KxP, np.float64)
  return y, v, X


def _trace_p(v_K, X_KxP) -> float:
  """tr(P) = Σ a − tr((X^T A X)^{-1} X^T A² X), a = 1/v."""
  a_K = 1.0 / v_K
  xtax_PxP = X_KxP.T @ (a_K[:, None] * X_KxP)
  xta2x_PxP = X_KxP.T @ ((a_K * a_K)[:, None] * X_KxP)
  return float(a_K.sum() - np.trace(np.linalg.solve(xtax_PxP, xta2x_PxP)))


def tau2_dl(y_K, v_K, X_KxP=None) -> float:
  """Method-of-moments τ² (DerSimonian–Laird; Raudenbush's form for a design X, which
  defaults to the intercept only)."""
  y, v, X = _arrays(y_K, v_K, X_KxP)
  k, p = X.shape
  _, _, q_e, _ = _wls(y, v, X, 0.0)
  return max(0.0, (q_e - (k - p)) / _trace_p(v, X))


def restricted_loglik(tau2: float, y_K, v_K, X_KxP=None) -> float:
  """ℓ_R(τ²) up to a constant (module docstring); X defaults to the intercept only."""
  y, v, X = _arrays(y_K, v_K, X_KxP)
  _, inv_PxP, rss, w_K = _wls(y, v, X, float(tau2))
  # log det(X^T W X) = −log det((X^T W X)^{-1})
  return float(-0.5 * np.sum(np.log(v + tau2)) + 0.5 * np.linalg.slogdet(inv_PxP)[1]
               - 0.5 * rss)


def tau2_reml(y_K, v_K, X_KxP=None) -> float:
  """REML τ²: the maximiser of ``restricted_loglik`` over τ² ≥ 0 (bounded Brent)."""
  y, v, X = _arrays(y_K, v_K, X_KxP)
  upper = 10.0 * (float(np.var(y, ddof=1)) + float(v.max()))
  neg = lambda t: -restricted_loglik(t, y, v, X)
  res = scipy.optimize.minimize_scalar(neg, bounds=(0.0, upper), method="bounded",
                                       options={"xatol": 1e-10 * upper})
  return 0.0 if neg(0.0) <= res.fun else float(res.x)


def _tau2_q_profile(y, v, X, alpha: float) -> tuple[float, float]:
  k, p = X.shape
  df = k - p
  q_of = lambda t: _wls(y, v, X, t)[2]
  upper = 100.0 * (float(np.var(y, ddof=1)) + float(v.max())) + 1e-12

  def solve(target):
    if q_of(0.0) <= target:  # Q is decreasing in τ²: already below at 0
      return 0.0
    hi = upper
    while q_of(hi) > target:
      hi *= 10.0
    return float(scipy.optimize.brentq(lambda t: q_of(t) - target, 0.0, hi, xtol=1e-12))

  return (solve(scipy.stats.chi2.ppf(1 - alpha / 2, df)),
          solve(scipy.stats.chi2.ppf(alpha / 2, df)))


def _fit(y, v, X, method: str, ci: str, alpha: float):
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if ci not in CI_METHODS:
    raise ValueError(f"ci must be one of {CI_METHODS}, got {ci!r}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  k, p = X.shape
  df = k - p
  tau2 = tau2_dl(y, v, X) if method == "dl" else tau2_reml(y, v, X)
  beta, inv, rss, w = _wls(y, v, X, tau2)
  if ci in ("hksj", "hksj_modified"):
    cov = (max(1.0, rss / df) if ci == "hksj_modified" else rss / df) * inv
    crit = scipy.stats.t.ppf(1 - alpha / 2, df)
    pval = lambda z: float(2 * scipy.stats.t.sf(abs(z), df))
  else:
    cov = inv
    crit = scipy.stats.norm.ppf(1 - alpha / 2)
    pval = lambda z: float(2 * scipy.stats.norm.sf(abs(z)))
  se = np.sqrt(np.diag(cov))
  _, _, q_e, _ = _wls(y, v, X, 0.0)
  trace_p = _trace_p(v, X)
  typical_v = df / trace_p
  # Sensitivity and prediction pieces, computed beside (never inside) the ones above.
  scale = rss / df
  se_mod = np.sqrt(np.diag(max(1.0, scale) * inv))
  crit_t = scipy.stats.t.ppf(1 - alpha / 2, df)
  pi_df = df - 1
  crit_pi = scipy.stats.t.ppf(1 - alpha / 2, pi_df) if pi_df >= 1 else float("nan")
  return dict(beta=beta, se=se, crit=crit, pval=pval, tau2=tau2,
              tau2_ci=_tau2_q_profile(y, v, X, alpha), q=q_e, df=df,
              q_p=float(scipy.stats.chi2.sf(q_e, df)),
              i2=tau2 / (tau2 + typical_v), w=w, cov=cov, scale=float(scale),
              ci_modified=[(float(b - crit_t * e), float(b + crit_t * e))
                           for b, e in zip(beta, se_mod)],
              pi_df=int(pi_df), crit_pi=float(crit_pi))


def _prediction_interval(mean: float, var_mean: float, tau2: float, crit_pi: float):
  half = crit_pi * np.sqrt(tau2 + var_mean)
  return float(mean - half), float(mean + half)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def random_effects(y_K, v_K, *, method: str = "reml", ci: str = "hksj",
                   alpha: float = 0.05) -> PooledEffect:
  """Random-effects pooled effect μ of per-category effects ``y_K`` with known
  within-category variances ``v_K``.

  ``μ̂ = Σ w_i y_i / Σ w_i``, ``w_i = 1/(v_i + τ̂²)``; τ̂² by ``method`` ("reml" or "dl",
  DerSimonian–Laird); the interval for μ by ``ci`` ("hksj": ``SE² = Σ w_i (y_i − μ̂)² /
  ((k − 1) Σ w_i)`` with t_{k−1}; "normal": ``SE² = 1/Σ w_i`` with z). Formulas of τ²,
  its Q-profile interval, Q and I² in the module docstring.

  Also: ``pi``, the 1 − α prediction interval for a new category's true effect,
  ``μ̂ ± t_{k−2} · sqrt(τ̂² + SE²)`` with the SE of ``ci`` (NaN for k < 3); ``ci_modified``,
  the modified-HKSJ interval (``max(1, q)``) as a sensitivity; ``hksj_scale`` = q.
  """
  y, v, X = _check(y_K, v_K, p=1)
  f = _fit(y, v, X, method, ci, alpha)
  mu, se = float(f["beta"][0]), float(f["se"][0])
  return PooledEffect(mu=mu, se=se, ci=(mu - f["crit"] * se, mu + f["crit"] * se),
                      p_value=f["pval"](mu / se) if se > 0 else float("nan"),
                      tau2=f["tau2"], tau2_ci=f["tau2_ci"], q=f["q"], q_df=f["df"],
                      q_p_value=f["q_p"], i2=f["i2"], k=len(y), method=method, ci_method=ci,
                      weights_K=f["w"] / f["w"].sum(),
                      pi=_prediction_interval(mu, se * se, f["tau2"], f["crit_pi"]),
                      pi_df=f["pi_df"], ci_modified=f["ci_modified"][0],
                      hksj_scale=f["scale"], alpha=alpha)


def meta_regression(y_K, v_K, x_K, *, method: str = "reml", ci: str = "hksj",
                    alpha: float = 0.05) -> MetaRegression:
  """Random-effects meta-regression of ``y_K`` on one covariate ``x_K`` (e.g. the
  mean-only model's image AUROC per category).

  Weighted least squares ``(intercept, slope) = (X^T W X)^{-1} X^T W y`` with
  ``X = [1, x]`` and ``W = diag(1/(v_i + τ̂²))``, τ̂² the residual between-category
  variance by ``method`` ("reml" or "dl" = method of moments); SEs and intervals by
  ``ci`` (HKSJ: t_{k−2} with the residual scale q; normal: z), as in the module
  docstring. Needs k >= 3 categories and a non-constant x.
  """
  y, v, X = _check(y_K, v_K, x_K, p=2)
  f = _fit(y, v, X, method, ci, alpha)
  (b0, b1), (s0, s1) = f["beta"], f["se"]
  c = f["crit"]
  return MetaRegression(
      intercept=float(b0), slope=float(b1), se_intercept=float(s0), se_slope=float(s1),
      ci_intercept=(float(b0 - c * s0), float(b0 + c * s0)),
      ci_slope=(float(b1 - c * s1), float(b1 + c * s1)),
      p_slope=f["pval"](b1 / s1) if s1 > 0 else float("nan"),
      tau2=f["tau2"], tau2_ci=f["tau2_ci"], q_e=f["q"], q_df=f["df"], q_p_value=f["q_p"],
      i2=f["i2"], k=len(y), method=method, ci_method=ci, cov=f["cov"],
      ci_slope_modified=f["ci_modified"][1], hksj_scale=f["scale"], alpha=alpha)


def predict(fit: MetaRegression, x: float) -> Prediction:
  """Mean effect of a meta-regression at covariate value ``x`` with its CI, and the
  prediction interval for a new category's true effect there (module docstring):

    m(x) = b₀ + b₁·x,   Var m(x) = x₀ᵀ Cov x₀ with x₀ = (1, x),
    CI = m ± crit · sqrt(Var m),   PI = m ± t_{k−3} · sqrt(τ̂² + Var m),

  ``crit`` and ``Cov`` those of the fit's ``ci`` (t_{k−2} for HKSJ, z for normal);
  the PI is NaN for k < 4.
  """
  if fit.cov is None:
    raise ValueError("predict: the MetaRegression carries no covariance (build it with "
                     "meta_regression)")
  x0 = np.array([1.0, float(x)])
  mean = float(fit.intercept + fit.slope * float(x))
  var = float(x0 @ fit.cov @ x0)
  df = fit.k - 2
  crit = (scipy.stats.t.ppf(1 - fit.alpha / 2, df) if fit.ci_method != "normal"
          else scipy.stats.norm.ppf(1 - fit.alpha / 2))
  se = float(np.sqrt(var))
  crit_pi = scipy.stats.t.ppf(1 - fit.alpha / 2, df - 1) if df - 1 >= 1 else float("nan")
  return Prediction(x=float(x), mean=mean, se=se,
                    ci=(float(mean - crit * se), float(mean + crit * se)),
                    pi=_prediction_interval(mean, var, fit.tau2, float(crit_pi)),
                    pi_df=int(df - 1))


def effects_from_seeds(diffs_KxS, pool_variance: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Per-category effect and its within-category variance from per-seed differences:
  ``y_i = mean_s d_is``, ``v_i = var_s(d_is) / S_i`` (unbiased variance, S_i >= 2 seeds).
  A list of per-category arrays of unequal length is accepted.

  ``pool_variance``: ``v_i = s²_pooled / S_i`` with ``s²_pooled = Σ (S_i − 1) s_i² /
  Σ (S_i − 1)`` — one seed-noise variance for all categories, on Σ (S_i − 1) df. With
  3–5 seeds a category's own s_i² (2–4 df) is often far too small, and inverse-variance
  weights then hand that category the pooled estimate: 6 categories × 4 seeds without
  any effect, the HKSJ interval on per-category variances rejects 10–15 % of the time
  at nominal 5 % (``hksj_modified`` still > 5 % when one variance is tiny); pooled, the
  weights are equal (for equal S) and HKSJ is the t-interval over categories (tested).
  """
  rows = [np.asarray(d, np.float64).ravel() for d in diffs_KxS]
  bad = [i for i, d in enumerate(rows) if len(d) < 2 or not np.isfinite(d).all()]
  if bad:
    raise ValueError(f"categories {bad}: need >= 2 finite per-seed differences each")
  y = np.array([d.mean() for d in rows])
  if pool_variance:
    s2 = sum((len(d) - 1) * d.var(ddof=1) for d in rows) / sum(len(d) - 1 for d in rows)
    return y, np.array([s2 / len(d) for d in rows])
  v = np.array([d.var(ddof=1) / len(d) for d in rows])
  return y, v


# ----------------------------------------------------------------------------
# Equivalence (TOST)
# ----------------------------------------------------------------------------


class Equivalence(NamedTuple):
  """Two one-sided tests of ``low < θ < high`` (``tost``)."""
  mean: float
  se: float
  df: float
  margin: tuple[float, float]
  p: float                      # max of the two one-sided p-values
  equivalent: bool              # p < alpha  ⇔  ci90 inside (low, high)
  ci90: tuple[float, float]     # the 1 − 2α interval (90 % at α = 0.05)
  alpha: float


def tost(mean: float, se: float, df: float, margin, *, alpha: float = 0.05) -> Equivalence:
  """Equivalence test of an estimate with a t (or normal) sampling distribution
  (Schuirmann 1987): H₀: θ ≤ low or θ ≥ high against H₁: low < θ < high.

  ``margin``: m > 0 for (−m, m), or a pair (low, high) with low < high; fixed before the
  data are seen. ``df``: the estimate's degrees of freedom (``np.inf``: normal), e.g.
  n − 1 for a mean of n paired seed-level differences, k − 1 for an HKSJ pooled effect.

    p_low  = P(T_df ≥ (mean − low) / se),   p_high = P(T_df ≤ (mean − high) / se),
    p = max(p_low, p_high),   equivalent ⇔ p < α,

  which holds exactly when the 1 − 2α interval ``mean ± t_{df, 1−α} · se`` lies inside
  (low, high). An estimate with se = 0 is equivalent iff it lies strictly inside.
  """
  if np.ndim(margin) == 0:
    m = float(margin)
    if not m > 0:
      raise ValueError(f"tost: margin must be > 0 (or a pair low < high), got {margin!r}")
    low, high = -m, m
  else:
    low, high = (float(b) for b in margin)
    if not low < high:
      raise ValueError(f"tost: margin pair must have low < high, got {margin!r}")
  mean, se, df = float(mean), float(se), float(df)
  if not (np.isfinite(mean) and np.isfinite(se) and se >= 0 and df > 0):
    raise ValueError(f"tost: need a finite mean, finite se >= 0 and df > 0, got mean={mean}, "
                     f"se={se}, df={df}")
  if not 0 < alpha < 0.5:
    raise ValueError(f"tost: alpha must lie in (0, 0.5), got {alpha}")
  dist = scipy.stats.norm if np.isinf(df) else scipy.stats.t(df)
  if se == 0:
    p = 0.0 if low < mean < high else 1.0
  else:
    p = float(max(dist.sf((mean - low) / se), dist.cdf((mean - high) / se)))
  half = float(dist.ppf(1 - alpha)) * se
  return Equivalence(mean=mean, se=se, df=df, margin=(low, high), p=p, equivalent=p < alpha,
                     ci90=(mean - half, mean + half), alpha=alpha)


def tost_paired(diffs_S, margin, *, alpha: float = 0.05) -> Equivalence:
  """``tost`` of the mean of paired differences (e.g. per seed: arm A − arm B on the same
  seed): mean, ``se = sd/√n`` (ddof 1), n − 1 df; as statsmodels' ``ttost_paired``."""
  d = np.asarray(diffs_S, np.float64).reshape(-1)
  if d.size < 2 or not np.isfinite(d).all():
    raise ValueError(f"tost_paired: need >= 2 finite paired differences, got {d.size} "
                     f"({int((~np.isfinite(d)).sum())} non-finite)")
  return tost(float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), d.size - 1, margin,
              alpha=alpha)


__all__ = ["PooledEffect", "MetaRegression", "Prediction", "Equivalence", "random_effects",
           "meta_regression", "predict", "effects_from_seeds", "tost", "tost_paired",
           "tau2_dl", "tau2_reml", "restricted_loglik", "METHODS", "CI_METHODS"]
