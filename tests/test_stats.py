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

from tailjax import metaanalysis  # noqa: E402
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


# ----------------------------------------------------------------------------
# per-category verdicts and heterogeneity with the test images counted
# ----------------------------------------------------------------------------


def _with_test_noise(rng, mean, sd_seed, sd_test, s=4, r=300):
  """Per-seed paired differences on the observed test set, ``mean + seed noise + b``
  (b: the test set's draw, shared by the seeds), and on r resamples ``... + b_r``."""
  d_S = mean + sd_seed * rng.normal(size=s)
  b_R = sd_test * rng.normal(size=r)
  return d_S + sd_test * rng.normal(), d_S[:, None] + b_R[None, :]


def test_seed_test_test_is_the_seed_t_test_without_test_noise_and_welch_with_it():
  d = np.array([0.031, 0.024, 0.040, 0.028])
  flat = tstats.seed_test_test(d, np.repeat(d[:, None], 40, axis=1))
  assert flat["df"] == pytest.approx(3) and flat["p"] == pytest.approx(
      stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
  rng = np.random.default_rng(0)
  d, reps = _with_test_noise(rng, 0.01, 0.004, 0.01)
  got = tstats.seed_test_test(d, reps)
  iv = tstats.seed_test_interval(d, reps, bounds=tstats.AUC_DIFF_BOUNDS)
  assert got["se"] == iv["se"] and got["df"] == iv["df"] and got["df"] > 3
  assert got["p"] == pytest.approx(2 * stats.t.sf(abs(iv["mean"]) / iv["se"], iv["df"]),
                                   rel=1e-12)
  assert np.isnan(tstats.seed_test_test(np.zeros(3), np.zeros((3, 5)))["p"])   # not "significant"


def test_category_verdicts_with_replicates_count_the_test_images():
  rng = np.random.default_rng(1)
  strong = {c: _with_test_noise(rng, 0.08, 0.005, 0.01) for c in "abc"}
  null = {c: _with_test_noise(rng, 0.0, 0.005, 0.01) for c in "abc"}
  # A tiny seed spread on one noisy test set: the seed t-test calls it, the test images don't.
  lucky = {}
  for c in "abc":
    d_S = 0.02 + 0.0005 * rng.normal(size=4)
    lucky[c] = d_S, d_S[:, None] + 0.03 * rng.normal(size=300)[None, :]
  res = {}
  for name, cats in (("strong", strong), ("null", null), ("lucky", lucky)):
    d = {c: v[0] for c, v in cats.items()}
    reps = {c: v[1] for c, v in cats.items()}
    res[name] = (tstats.category_verdicts(d, replicates=reps), tstats.category_verdicts(d))
    got = res[name][0]
    assert got["test_images"] and not res[name][1]["test_images"]
    for c in cats:
      want = tstats.seed_test_test(d[c], reps[c])
      assert got["categories"][c]["p"] == want["p"] and got["categories"][c]["se"] == want["se"]
    assert got["heterogeneity"] == tstats.heterogeneity(d, reps)
  assert res["strong"][0]["pooled"] == "better"
  assert all(v["sign"] == 1 for v in res["strong"][0]["categories"].values())
  assert res["null"][0]["pooled"] == "no significant difference"
  assert res["lucky"][1]["pooled"] == "better"
  assert res["lucky"][0]["pooled"] == "no significant difference"


def test_category_verdicts_with_replicates_hold_the_null():
  rng = np.random.default_rng(2)
  n, significant = 150, 0
  for _ in range(n):
    cats = {c: _with_test_noise(rng, 0.0, 0.01, 0.01, r=100) for c in "ab"}
    res = tstats.category_verdicts({c: v[0] for c, v in cats.items()},
                                   replicates={c: v[1] for c, v in cats.items()})
    significant += res["pooled"] != "no significant difference"
  assert significant / n <= 0.1, significant / n


def test_heterogeneity_with_replicates_adds_the_test_variance():
  """Categories whose effects differ by about their test sets' noise: counting only the
  seeds reads that as heterogeneity; counting the test images too, Q shrinks to about df.
  Q equals the random-effects fit's on ``effects_from_seeds_and_resamples``."""
  from tailjax import metaanalysis
  rng = np.random.default_rng(3)
  cats = {c: _with_test_noise(rng, 0.02, 0.002, 0.02) for c in "abcdef"}
  d = {c: v[0] for c, v in cats.items()}
  reps = {c: v[1] for c, v in cats.items()}
  seeds_only, with_test = tstats.heterogeneity(d), tstats.heterogeneity(d, reps)
  assert with_test["q"] < seeds_only["q"] / 10
  assert seeds_only["p"] < 0.01 and with_test["p"] > 0.01
  fit = metaanalysis.random_effects(*tstats.effects_from_seeds_and_resamples(
      list(d.values()), list(reps.values())))
  assert with_test["q"] == pytest.approx(fit.q, rel=1e-9) and with_test["df"] == 5
  # Without test noise in the resamples, the same Q as without them.
  flat = {c: np.repeat(v[:, None], 20, axis=1) for c, v in d.items()}
  assert tstats.heterogeneity(d, flat)["q"] == pytest.approx(seeds_only["q"], rel=1e-9)


# ----------------------------------------------------------------------------
# Per-category effects with the test images counted (effects_from_seeds_and_resamples)
# ----------------------------------------------------------------------------


def _seed_diffs(rng, sizes=(3, 4, 3, 5)):
  return [rng.normal(0.02 * i, 0.01, s) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("pool", [True, False])
def test_effects_with_resamples_without_test_noise_are_the_seed_only_effects(pool):
  """Every resample gives each seed its observed difference (no test-image noise):
  se_test = se_interaction = 0, so the effects are ``effects_from_seeds``'s."""
  d = _seed_diffs(np.random.default_rng(0))
  reps = [np.repeat(x[:, None], 50, axis=1) for x in d]
  y, v = tstats.effects_from_seeds_and_resamples(d, reps, pool_variance=pool)
  y0, v0 = metaanalysis.effects_from_seeds(d, pool_variance=pool)
  np.testing.assert_array_equal(y, y0)
  np.testing.assert_allclose(v, v0, rtol=1e-12)


def test_effects_with_resamples_add_each_categorys_own_test_variance():
  """Resample r shifts every seed of category i by the same b_ir (the test set's effect,
  shared by the seeds, no interaction): v_i = the pooled seed part + var_r(b_ir), the
  latter each category's own; about σ_b,i² for many resamples."""
  rng = np.random.default_rng(1)
  d = _seed_diffs(rng)
  sd_b = np.array([0.0, 0.005, 0.02, 0.04])
  b = [s * rng.normal(size=800) for s in sd_b]
  reps = [x[:, None] + bi[None, :] for x, bi in zip(d, b)]
  y, v = tstats.effects_from_seeds_and_resamples(d, reps)
  y0, v0 = metaanalysis.effects_from_seeds(d, pool_variance=True)
  np.testing.assert_array_equal(y, y0)
  np.testing.assert_allclose(v - v0, [np.var(bi, ddof=1) for bi in b], rtol=1e-9, atol=1e-15)
  np.testing.assert_allclose((v - v0)[1:], sd_b[1:] ** 2, rtol=0.15)
  # Unpooled, each category's variance is its seed + test-image interval's se².
  _, v_own = tstats.effects_from_seeds_and_resamples(d, reps, pool_variance=False)
  np.testing.assert_allclose(v_own, [tstats.seed_test_interval(x, r)["se"] ** 2
                                     for x, r in zip(d, reps)], rtol=1e-12)
  # A test-set effect that large swamps the seed spread: the noisier category weighs less.
  assert v[3] > 4 * v0[3]


def test_effects_with_resamples_check_their_inputs():
  d = _seed_diffs(np.random.default_rng(2))
  reps = [np.repeat(x[:, None], 5, axis=1) for x in d]
  with pytest.raises(ValueError, match="4 categories of differences but 3 of resamples"):
    tstats.effects_from_seeds_and_resamples(d, reps[:3])
  with pytest.raises(ValueError, match=r"categories \[1\]"):
    tstats.effects_from_seeds_and_resamples([d[0], d[1][:1]], reps[:2])
  with pytest.raises(ValueError, match=r"categories \[0\]"):
    tstats.effects_from_seeds_and_resamples([np.array([0.1, np.nan, 0.2])], [np.zeros((3, 5))])
