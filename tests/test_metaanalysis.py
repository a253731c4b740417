"""Random-effects meta-analysis: a textbook reference, brute-force checks, planted
effects and nulls (simulated meta-analyses with fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from tailjax import metaanalysis as M

# BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg): tpos, tneg, cpos, cneg,
# absolute latitude.
BCG = np.array([[4, 119, 11, 128, 44], [6, 300, 29, 274, 55], [3, 228, 11, 209, 42],
                [62, 13536, 248, 12619, 52], [33, 5036, 47, 5761, 13],
                [180, 1361, 372, 1079, 44], [8, 2537, 10, 619, 19],
                [505, 87886, 499, 87892, 13], [29, 7470, 45, 7232, 27],
                [17, 1699, 65, 1600, 42], [186, 50448, 141, 27197, 18],
                [5, 2493, 3, 2338, 33], [27, 16886, 29, 17825, 33]], float)


def _bcg():
  tp, tn, cp, cn, lat = BCG.T
  y = np.log(tp / (tp + tn)) - np.log(cp / (cp + cn))  # log risk ratio
  v = 1 / tp - 1 / (tp + tn) + 1 / cp - 1 / (cp + cn)
  return y, v, lat


def test_bcg_matches_the_published_metafor_results():
  # metafor: rma(measure="RR", ...) and rma(..., method="DL"), rma(..., mods=~ablat);
  # confint() for the Q-profile interval of τ².
  y, v, lat = _bcg()
  reml = M.random_effects(y, v, method="reml", ci="normal")
  assert reml.mu == pytest.approx(-0.7145, abs=1e-4)
  assert reml.se == pytest.approx(0.1798, abs=1e-4)
  assert reml.ci == pytest.approx((-1.0669, -0.3622), abs=1e-4)
  assert reml.tau2 == pytest.approx(0.3132, abs=1e-4)
  assert reml.tau2_ci == pytest.approx((0.1197, 1.1115), abs=1e-4)
  assert reml.q == pytest.approx(152.2330, abs=1e-4) and reml.q_df == 12
  assert reml.i2 == pytest.approx(0.9222, abs=1e-4)
  dl = M.random_effects(y, v, method="dl", ci="normal")
  assert dl.mu == pytest.approx(-0.7141, abs=1e-4)
  assert dl.tau2 == pytest.approx(0.3088, abs=1e-4)
  reg = M.meta_regression(y, v, lat, method="reml", ci="normal")
  assert reg.intercept == pytest.approx(0.2515, abs=1e-4)
  assert reg.slope == pytest.approx(-0.0291, abs=1e-4)
  assert reg.se_intercept == pytest.approx(0.2491, abs=1e-4)
  assert reg.se_slope == pytest.approx(0.0072, abs=1e-4)
  assert reg.tau2 == pytest.approx(0.0764, abs=1e-4)
  assert reg.q_e == pytest.approx(30.7331, abs=1e-4) and reg.q_df == 11


def test_dl_equals_the_direct_formula():
  y, v, _ = _bcg()
  w = 1 / v
  ybar = np.sum(w * y) / w.sum()
  q = np.sum(w * (y - ybar) ** 2)
  tau2 = max(0.0, (q - (len(y) - 1)) / (w.sum() - np.sum(w ** 2) / w.sum()))
  ws = 1 / (v + tau2)
  mu = np.sum(ws * y) / ws.sum()
  r = M.random_effects(y, v, method="dl", ci="normal")
  assert r.tau2 == pytest.approx(tau2, rel=1e-12)
  assert r.mu == pytest.approx(mu, rel=1e-12)
  assert r.se == pytest.approx(ws.sum() ** -0.5, rel=1e-12)
  assert r.i2 == pytest.approx((q - (len(y) - 1)) / q, rel=1e-10)  # Higgins–Thompson
  # HKSJ: q-scaled SE, t quantile on k − 1 df.
  h = M.random_effects(y, v, method="dl", ci="hksj")
  se = np.sqrt(np.sum(ws * (y - mu) ** 2) / ((len(y) - 1) * ws.sum()))
  assert h.se == pytest.approx(se, rel=1e-12)
  from scipy import stats
  assert h.ci[1] - h.mu == pytest.approx(stats.t.ppf(0.975, len(y) - 1) * se, rel=1e-10)


def _grid_reml(y, v, X):
  """Restricted log-likelihood written out independently, maximised on a fine grid."""
  grid = np.linspace(0.0, 2.0, 200001)
  best, arg = -np.inf, None
  for t in grid[::100]:  # coarse pass, then refine around the best coarse point
    w = 1 / (v + t)
    xtwx = X.T @ (w[:, None] * X)
    beta = np.linalg.solve(xtwx, X.T @ (w * y))
    r = y - X @ beta
    ll = -0.5 * (np.sum(np.log(v + t)) + np.log(np.linalg.det(xtwx)) + np.sum(w * r * r))
    if ll > best:
      best, arg = ll, t
  fine = grid[(grid >= arg - 0.002) & (grid <= arg + 0.002)]
  lls = []
  for t in fine:
    w = 1 / (v + t)
    xtwx = X.T @ (w[:, None] * X)
    beta = np.linalg.solve(xtwx, X.T @ (w * y))
    r = y - X @ beta
    lls.append(-0.5 * (np.sum(np.log(v + t)) + np.log(np.linalg.det(xtwx)) + np.sum(w * r * r)))
  return float(fine[int(np.argmax(lls))])


def test_reml_is_the_brute_force_maximum_of_the_restricted_likelihood():
  y, v, lat = _bcg()
  one = np.ones((len(y), 1))
  assert M.tau2_reml(y, v) == pytest.approx(_grid_reml(y, v, one), abs=2e-5)
  X = np.stack([np.ones_like(lat), lat], 1)
  assert M.tau2_reml(y, v, X) == pytest.approx(_grid_reml(y, v, X), abs=2e-5)


def test_homogeneous_effects_give_tau2_zero():
  v = np.full(10, 0.04)
  y = 0.3 + np.array([0.01, -0.02, 0.015, -0.01, 0.0, 0.005, -0.005, 0.02, -0.015, 0.0])
  for method in M.METHODS:
    r = M.random_effects(y, v, method=method)
    assert r.tau2 == 0.0 and r.i2 == 0.0 and r.tau2_ci[0] == 0.0


def _simulate(rng, k, mu, tau2, slope=0.0):
  v = rng.uniform(0.002, 0.02, k)
  x = rng.uniform(0.55, 0.95, k)  # like the mean-only model's image AUROC
  y = mu + slope * x + rng.normal(0, np.sqrt(tau2), k) + rng.normal(0, np.sqrt(v))
  return y, v, x


@pytest.mark.parametrize("method", M.METHODS)
def test_planted_pooled_effect_is_unbiased_and_hksj_covers(method):
  rng = np.random.default_rng(0)
  mu, tau2, reps = 0.5, 0.01, 400
  est, cover, t2 = [], [], []
  for _ in range(reps):
    y, v, _ = _simulate(rng, 12, mu, tau2)
    r = M.random_effects(y, v, method=method, ci="hksj")
    est.append(r.mu)
    t2.append(r.tau2)
    cover.append(r.ci[0] <= mu <= r.ci[1])
  est = np.asarray(est)
  assert abs(est.mean() - mu) < 3 * est.std() / np.sqrt(reps)
  assert 0.92 <= np.mean(cover) <= 0.98
  # τ² is truncated at 0, so its mean is biased up a little, never by half.
  assert 0.7 * tau2 <= np.mean(t2) <= 1.3 * tau2


def test_normal_interval_under_covers_with_few_categories_hksj_does_not():
  # Why HKSJ is the default: few categories (6), heterogeneity above the sampling noise.
  rng = np.random.default_rng(1)
  mu, tau2, reps = 0.0, 0.05, 400
  cover = {"hksj": [], "normal": []}
  for _ in range(reps):
    y, v, _ = _simulate(rng, 6, mu, tau2)
    for ci in cover:
      r = M.random_effects(y, v, method="dl", ci=ci)
      cover[ci].append(r.ci[0] <= mu <= r.ci[1])
  assert np.mean(cover["normal"]) < 0.93
  assert 0.92 <= np.mean(cover["hksj"]) <= 0.98


@pytest.mark.parametrize("slope", [0.0, 1.5])
def test_meta_regression_planted_slope_and_null(slope):
  rng = np.random.default_rng(2 + int(slope))
  reps, k = 400, 8
  est, cover = [], []
  for _ in range(reps):
    y, v, x = _simulate(rng, k, 0.2, 0.005, slope=slope)
    r = M.meta_regression(y, v, x, method="reml", ci="hksj")
    est.append(r.slope)
    cover.append(r.ci_slope[0] <= slope <= r.ci_slope[1])
  est = np.asarray(est)
  assert abs(est.mean() - slope) < 3 * est.std() / np.sqrt(reps)
  assert 0.92 <= np.mean(cover) <= 0.98  # at slope 0: the CI covers 0 at ~95 %


def test_meta_regression_finds_a_planted_slope_it_should():
  rng = np.random.default_rng(5)
  x = np.linspace(0.55, 0.95, 10)
  v = np.full(10, 0.0004)
  y = -0.4 + 0.8 * x + rng.normal(0, 0.02, 10)
  r = M.meta_regression(y, v, x)
  assert r.ci_slope[0] > 0 and r.p_slope < 0.01
  assert r.slope == pytest.approx(0.8, abs=0.15)


def test_effects_from_seeds_and_errors():
  y, v = M.effects_from_seeds([[1.0, 2.0, 3.0], [0.0, 0.5]])
  np.testing.assert_allclose(y, [2.0, 0.25])
  np.testing.assert_allclose(v, [1.0 / 3, 0.125 / 2])
  with pytest.raises(ValueError, match="categories \\[1\\]"):
    M.effects_from_seeds([[1.0, 2.0], [1.0]])
  with pytest.raises(ValueError, match="variances v must be > 0"):
    M.random_effects([0.1, 0.2], [0.01, 0.0])
  with pytest.raises(ValueError, match="constant"):
    M.meta_regression([0.1, 0.2, 0.3], [0.01] * 3, [1.0] * 3)
  with pytest.raises(ValueError, match="method"):
    M.random_effects([0.1, 0.2], [0.01, 0.01], method="pm")
  with pytest.raises(ValueError, match="at least 3 categories"):
    M.meta_regression([0.1, 0.2], [0.01] * 2, [0.5, 0.7])


def test_seed_estimated_variances_pooled_keep_the_null_at_nominal():
  """The report's setting: each category's variance estimated from 3–4 seeds, no true
  effect, no heterogeneity. Weighting by each category's own variance, HKSJ rejects the
  null far more often than 5 %; with the variance pooled (equal weights, the t-interval
  over categories) it stays near nominal. The modified HKSJ is never narrower."""
  rng = np.random.default_rng(0)
  reject = {"own": 0, "own_modified": 0, "pooled": 0}
  reps = 300
  for i in range(reps):
    k, s = (6, 4) if i % 2 else (9, 3)
    d = [rng.normal(0.0, 0.006, s) for _ in range(k)]
    own = M.random_effects(*M.effects_from_seeds(d), method="reml", ci="hksj")
    mod = M.random_effects(*M.effects_from_seeds(d), method="reml", ci="hksj_modified")
    y, v = M.effects_from_seeds(d, pool_variance=True)
    pooled = M.random_effects(y, v, method="reml", ci="hksj")
    assert mod.ci[1] - mod.ci[0] >= own.ci[1] - own.ci[0] - 1e-15
    np.testing.assert_allclose(pooled.ci, scipy.stats.ttest_1samp(y, 0.0).confidence_interval(),
                               rtol=1e-8)
    for name, r in (("own", own), ("own_modified", mod), ("pooled", pooled)):
      reject[name] += not (r.ci[0] <= 0.0 <= r.ci[1])
  assert reject["own"] / reps > 0.08
  assert reject["pooled"] / reps <= 0.07
  # Pooled: Σ (S_i − 1) s_i² / Σ (S_i − 1), divided by each S_i.
  y, v = M.effects_from_seeds([[1.0, 2.0, 3.0], [0.0, 0.5]], pool_variance=True)
  np.testing.assert_allclose(v, np.array([1.0, 1.0]) * (2 * 1.0 + 1 * 0.125) / 3 / [3, 2])
