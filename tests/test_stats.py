import numpy as np
import pytest
from scipy import stats

from tailjax.stats import mean_ci


def test_mean_ci_matches_scipy():
  v = np.array([0.41, 0.47, 0.44, 0.52])
  got = mean_ci(v)
  lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
  assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
  assert got["std"] == pytest.approx(v.std(ddof=1)) and got["n"] == 4
  lo90, _ = stats.t.interval(0.90, 3, loc=v.mean(), scale=stats.sem(v))
  assert mean_ci(v, 0.90)["lo"] == pytest.approx(lo90)


def test_mean_ci_degenerate_cases():
  one = mean_ci([0.3])
  assert one["mean"] == 0.3 and np.isnan(one["lo"]) and np.isnan(one["std"])
  const = mean_ci([0.2, 0.2, 0.2])
  assert const["lo"] == pytest.approx(0.2) and const["hi"] == pytest.approx(0.2)


# ----------------------------------------------------------------------------
# seed + test-set intervals (stats.seed_test_interval, stats.auc_interval)
# ----------------------------------------------------------------------------

from tailjax import stats as tstats  # noqa: E402


def _scores(rng, mu_S, n=64, sd_bag=0.8, sd_seed_bag=0.6):
  """S models on one test set of n positive + n negative items: ``s = μ_s·y + e + η_s``
  (e shared by every model: the test set's effect; η_s the model × item interaction).
  Population AUC of model s: ``Φ(μ_s / √(2(sd_bag² + sd_seed_bag²)))``."""
  y = np.r_[np.ones(n), np.zeros(n)]
  e = sd_bag * rng.normal(size=2 * n)
  return np.stack([m * y + e + sd_seed_bag * rng.normal(size=2 * n) for m in mu_S]), y


def _inside(ci, lo, hi):
  return all(lo <= c["lo"] <= c["mean"] <= c["hi"] <= hi for c in (ci, ci["seed_ci"], ci["test_ci"]))


def test_auc_intervals_stay_inside_0_1_near_1():
  # The report's case: mean 0.963 with a wide seed spread; a raw t-interval reaches 1.02.
  rng = np.random.default_rng(0)
  v_S = np.array([0.90, 0.99, 0.93, 1.0, 0.995])
  rep_SxR = np.clip(v_S[:, None] + 0.02 * rng.normal(size=(5, 400)), 0, 1)
  ci = tstats.seed_test_interval(v_S, rep_SxR, bounds=tstats.AUC_BOUNDS)
  assert _inside(ci, 0.0, 1.0) and ci["hi"] < 1.0, ci
  # Perfect separation everywhere: a point interval on the bound.
  ci = tstats.seed_test_interval(np.ones(5), np.ones((5, 100)), bounds=tstats.AUC_BOUNDS)
  assert (ci["lo"], ci["hi"]) == (1.0, 1.0)
  # Planted near-1 AUCs on fresh test sets: inside [0, 1] and still covering the true AUC;
  # paired differences inside [-1, 1].
  mu = 3.0
  true_auc = stats.norm.cdf(mu / np.sqrt(2 * (0.8 ** 2 + 0.6 ** 2)))     # 0.983
  covered = []
  for i in range(100):
    s, y = _scores(rng, mu + 0.3 * rng.normal(size=5))
    ci = tstats.auc_interval(s, y, n_boot=300, seed=i)
    assert _inside(ci, 0.0, 1.0), ci
    covered.append(ci["lo"] <= true_auc <= ci["hi"])
    d = tstats.auc_interval(s, y, minus_SxN=s[::-1] + rng.normal(size=s.shape), n_boot=100, seed=i)
    assert _inside(d, -1.0, 1.0) and d["bounds"] == [-1.0, 1.0]
  assert np.mean(covered) >= 0.90, np.mean(covered)


def test_seed_and_test_components_are_each_counted_once():
  rng = np.random.default_rng(1)
  # No seed spread (identical models): the interval is the test-set-only one.
  s, y = _scores(rng, [1.0])
  ci = tstats.auc_interval(np.repeat(s, 4, axis=0), y, n_boot=300)
  assert ci["se_seed"] == 0 and ci["se_interaction"] < 1e-12
  assert (ci["lo"], ci["hi"]) == pytest.approx((ci["test_ci"]["lo"], ci["test_ci"]["hi"]), abs=1e-12)
  # No test-set noise (every resample gives each seed its own value): the seed-only interval,
  # a t-interval with S - 1 degrees of freedom.
  v_S = np.array([0.71, 0.75, 0.69, 0.80])
  ci = tstats.seed_test_interval(v_S, np.repeat(v_S[:, None], 50, axis=1))
  assert ci["se_test"] < 1e-12 and ci["df"] == pytest.approx(3)
  assert (ci["lo"], ci["hi"]) == pytest.approx((ci["seed_ci"]["lo"], ci["seed_ci"]["hi"]))
  lo, hi = stats.t.interval(0.95, 3, loc=v_S.mean(), scale=stats.sem(v_S))
  assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi))
  # Seeds that differ only by the seed x item interaction (same population AUC): the seed
  # spread on one test set is that interaction, which the bootstrap already holds. Counting
  # it once leaves se ≈ se_test; adding both variances would count it twice (~70 % more).
  once, both = [], []
  for i in range(40):
    s, y = _scores(rng, [1.0] * 5, sd_bag=0.3, sd_seed_bag=1.0)
    ci = tstats.auc_interval(s, y, n_boot=300, seed=i)
    assert ci["se"] ** 2 == pytest.approx(max(ci["se_seed"] ** 2 - ci["se_interaction"] ** 2, 0)
                                          + ci["se_test"] ** 2)
    once.append(ci["se"] ** 2 / ci["se_test"] ** 2)
    both.append((ci["se_seed"] ** 2 + ci["se_test"] ** 2) / ci["se_test"] ** 2)
  assert np.mean(once) < 1.3 < 1.5 < np.mean(both), (np.mean(once), np.mean(both))


# ----------------------------------------------------------------------------
# paired tests, Holm, per-category verdicts
# ----------------------------------------------------------------------------


def test_holm_matches_hand_computation():
  adj = tstats.holm([0.01, 0.04, 0.03, np.nan])
  np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])
  assert np.isnan(adj[3])


def test_category_verdicts_mixed_and_heterogeneous():
  res = tstats.category_verdicts({"a": [0.05, 0.06, 0.055], "b": [-0.03, -0.035, -0.032],
                                  "c": [0.01, -0.01, 0.0]})
  assert res["pooled"] == "mixed"
  assert res["categories"]["a"]["sign"] == 1 and res["categories"]["b"]["sign"] == -1
  assert res["categories"]["c"]["sign"] == 0 and res["heterogeneity"]["p"] < 0.01
  same = tstats.category_verdicts({"a": [0.05, 0.06, 0.055], "b": [0.04, 0.05, 0.045]})
  assert same["pooled"] == "better"


def test_paired_test_is_scipys_one_sample_t_test_without_undefined_values():
  d = [0.02, 0.05, -0.01, 0.04, np.nan]
  got = tstats.paired_test(d)
  want = stats.ttest_1samp([0.02, 0.05, -0.01, 0.04], 0.0)
  assert got["n"] == 4 and got["p"] == pytest.approx(want.pvalue)
  assert got["mean"] == pytest.approx(0.025) and got["lo"] < 0.025 < got["hi"]
  assert tstats.paired_test([np.nan])["n"] == 0 and np.isnan(tstats.paired_test([])["p"])


def test_heterogeneity_uses_the_random_effects_within_category_variance():
  """Q and I² come from the pooled seed variance, as the random-effects estimate does:
  Cochran's Q equals ``metaanalysis``'s on ``effects_from_seeds(pool_variance=True)``,
  and a category whose 3 seeds happen to agree closely does not blow Q up."""
  from tailjax import metaanalysis
  rng = np.random.default_rng(0)
  cats = {c: rng.normal(0.0, 1.0, 3) for c in "abcdef"}
  cats["a"] = np.array([0.5, 0.5001, 0.4999])          # a lucky, tiny seed variance
  het = tstats.heterogeneity(cats)
  y, v = metaanalysis.effects_from_seeds(list(cats.values()), pool_variance=True)
  fit = metaanalysis.random_effects(y, v)
  assert het["q"] == pytest.approx(fit.q, rel=1e-9) and het["df"] == 5
  assert het["p"] == pytest.approx(fit.q_p_value, rel=1e-9)
  # Each category's own variance would hand the lucky category a huge weight and Q with it.
  own_w = np.array([3 / np.var(d, ddof=1) for d in cats.values()])
  m = np.array([d.mean() for d in cats.values()])
  q_own = float(np.sum(own_w * (m - np.sum(own_w * m) / own_w.sum()) ** 2))
  assert q_own > 5 * het["q"]
