"""H1/H4/H7 statistics and the verdict rules (tailjax.analysis.hypotheses)."""

import json

import numpy as np
import pytest
from scipy import stats

from tailjax.analysis import hypotheses as H


# ----------------------------------------------------------------------------
# H1
# ----------------------------------------------------------------------------


def test_border_distance_distribution_is_exact_on_small_grids():
  # 4×5: the 2×3 interior is at distance 1, the 14 cells of the frame at 0
  d = H.border_distance_grid(4, 5)
  assert d.tolist() == [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
  values, pmf = H.uniform_border_distance_pmf(4, 5)
  assert values.tolist() == [0, 1] and pmf.tolist() == pytest.approx([14 / 20, 6 / 20])
  # 5×5: frame 16, ring 8, centre 1
  values, pmf = H.uniform_border_distance_pmf(5, 5)
  assert values.tolist() == [0, 1, 2] and pmf.tolist() == pytest.approx([16 / 25, 8 / 25, 1 / 25])
  # 14×14 (the study's grid): rings of 52, 44, ..., 4 cells, mean 364/196
  values, pmf = H.uniform_border_distance_pmf(14, 14)
  assert (pmf * 196).round().astype(int).tolist() == [52, 44, 36, 28, 20, 12, 4]
  assert float(values @ pmf) == pytest.approx(364 / 196)


def test_discrete_gof_matches_scipy_and_pools_small_bins():
  values, pmf = H.uniform_border_distance_pmf(5, 5)
  obs = np.array([0] * 40 + [1] * 30 + [2] * 5)           # n = 75, expected 48, 24, 3
  out = H.discrete_gof(obs, values, pmf)
  # the last bin (expected 3 < 5) is pooled into its neighbour
  ref = stats.chisquare([40, 35], [48, 27])
  assert out["chi2"] == pytest.approx(ref.statistic) and out["chi2_p"] == pytest.approx(ref.pvalue)
  assert out["chi2_df"] == 1 and out["observed"] == [40, 30, 5]
  cdf_obs = np.cumsum([40, 30, 5]) / 75
  assert out["ks_d"] == pytest.approx(np.max(np.abs(cdf_obs - np.cumsum(pmf))))
  with pytest.raises(ValueError, match="outside the support"):
    H.discrete_gof([0, 3], values, pmf)


def test_discrete_gof_p_values_separate_null_from_alternative():
  values, pmf = H.uniform_border_distance_pmf(14, 14)
  rng = np.random.default_rng(1)
  null = rng.choice(values, size=400, p=pmf)
  assert H.discrete_gof(null, values, pmf)["chi2_p"] > 0.01
  assert H.discrete_gof(null, values, pmf)["ks_p_mc"] > 0.01
  border = np.zeros(400, int)
  alt = H.discrete_gof(border, values, pmf, n_mc=500)
  assert alt["chi2_p"] < 1e-10 and alt["ks_p_mc"] == pytest.approx(1 / 501)


def test_compare_groups_matches_mannwhitneyu():
  rng = np.random.default_rng(0)
  a, b = rng.normal(1.2, 1, 40), rng.normal(1.0, 1, 300)
  out = H.compare_groups(a, b)
  ref = stats.mannwhitneyu(a, b, alternative="two-sided")
  assert out["u"] == ref.statistic and out["p"] == pytest.approx(ref.pvalue)
  assert out["ratio"] == pytest.approx(a.mean() / b.mean())
  assert out["auc"] == pytest.approx(np.mean(a[:, None] > b[None, :]) + 0.5 * np.mean(a[:, None] == b[None, :]))


def test_patch_cell_means_and_sobel():
  img = np.kron(np.arange(4.0).reshape(2, 2), np.ones((3, 3)))[None]   # 6×6, 2×2 constant blocks
  np.testing.assert_allclose(H.patch_cell_means(img, (2, 2))[0], [[0, 1], [2, 3]])
  # 7 px over 2 cells: edges round(0, 3.5, 7) = 0, 4, 7 (round half to even)
  v = np.arange(49.0).reshape(1, 7, 7)
  got = H.patch_cell_means(v, (2, 2))[0, 0, 0]
  assert got == pytest.approx(v[0, :4, :4].mean())
  with pytest.raises(ValueError, match="smaller than"):
    H.patch_cell_means(np.zeros((1, 3, 3)), (4, 4))
  flat = np.full((1, 32, 32, 3), 128, np.uint8)
  assert np.all(H.patch_sobel(flat, (4, 4)) == 0)
  step = flat.copy()
  step[:, :, 20:] = 255        # a vertical edge between columns 19 and 20: cell column 2 (16..23)
  sob = H.patch_sobel(step, (4, 4))[0]
  assert np.all(sob[:, 2] > 0) and np.all(sob[:, 0] == 0) and np.all(sob[:, 3] < sob[:, 2])


def test_tail_location_on_constructed_nll():
  rng = np.random.default_rng(0)
  h = w = 6
  nll = rng.normal(size=(50, h * w))
  corners = [0, w - 1, (h - 1) * w, h * w - 1]
  nll[:, corners] += 100          # the top-k (r = 4/36 → k = 4) are the four corners
  images = rng.integers(0, 50, (50, 24, 24, 3)).astype(np.uint8)
  out = H.tail_location(nll, (h, w), 4 / 36, images)
  assert out["k"] == 4 and out["distance_tail_mean"] == 0 and out["border_fraction_tail"] == 1.0
  assert out["distance_test"]["chi2_p"] < 1e-10
  assert np.asarray(out["tail_count_HxW"]).sum() == 200 and out["tail_count_HxW"][0][0] == 50
  assert out["sobel"]["n_a"] == 200 and out["sobel"]["n_b"] == 50 * 32
  assert out["sobel_by_stratum"]["interior"] is None  # no tail patch inside
  with pytest.raises(ValueError, match="grid"):
    H.tail_location(nll, (5, 5), 0.1)


# ----------------------------------------------------------------------------
# H7
# ----------------------------------------------------------------------------


def test_latent_calibration_matches_direct_scipy_calls():
  rng = np.random.default_rng(0)
  z = rng.standard_t(df=5, size=(600, 4)) * 0.7
  out = H.latent_calibration(z, n_shapiro=200, seed=3)
  flat = z.ravel()
  pct = np.arange(1, 100)
  emp, theo = np.percentile(flat, pct), stats.norm.ppf(pct / 100)
  assert out["qq_corr"] == pytest.approx(np.corrcoef(theo, emp)[0, 1])
  tp = np.array([1, 2, 5, 95, 98, 99])
  assert out["tail_error"] == pytest.approx(np.mean(np.abs(np.percentile(flat, tp) - stats.norm.ppf(tp / 100))))
  assert out["ks_p_mean"] == pytest.approx(np.mean([stats.kstest(z[:, c], "norm").pvalue for c in range(4)]))
  rows = np.random.default_rng(3).choice(600, 200, replace=False)
  assert out["shapiro_p_mean"] == pytest.approx(np.mean([stats.shapiro(z[rows, c]).pvalue for c in range(4)]))
  assert out["std"] == pytest.approx(flat.std()) and out["mean"] == pytest.approx(flat.mean())
  q = {e["percentile"]: e for e in out["quantiles"]}
  assert q[50.0]["theoretical"] == 0.0 and q[99.0]["empirical"] == pytest.approx(np.percentile(flat, 99))


def test_latent_calibration_separates_gaussian_from_compressed():
  rng = np.random.default_rng(1)
  good = H.latent_calibration(rng.normal(size=(4000, 3)))
  squeezed = H.latent_calibration(0.685 * rng.normal(size=(4000, 3)))
  assert good["qq_corr"] > 0.999 and good["tail_error"] < 0.05 and good["ks_reject_fraction"] <= 1 / 3
  # a scaled Gaussian still has a perfect QQ correlation: calibration needs the tail error too
  assert squeezed["qq_corr"] > 0.999 and squeezed["tail_error"] > 0.5
  assert squeezed["std"] == pytest.approx(0.685, abs=0.01) and squeezed["ks_reject_fraction"] == 1.0


# ----------------------------------------------------------------------------
# H4
# ----------------------------------------------------------------------------


def test_topk_dilution_on_constructed_hard_set():
  rng = np.random.default_rng(0)
  nll = rng.uniform(0, 1, (10, 50))
  nll[np.arange(10), rng.integers(0, 50, 10)] = 100.0   # one hard patch per image = 2 % of 500
  out = H.topk_dilution(nll, ratios=(0.02, 0.1, 1.0))
  assert out["hard_fraction"] == pytest.approx(0.02)
  rows = {r["ratio"]: r for r in out["rows"]}
  assert rows[0.02]["k"] == 1 and rows[0.02]["purity"] == 1.0 and rows[0.02]["effective"] == 50.0
  assert rows[0.1]["k"] == 5 and rows[0.1]["purity"] == pytest.approx(0.2)
  assert rows[0.1]["effective"] == pytest.approx(0.2 * 10)
  assert rows[1.0]["purity"] == pytest.approx(0.02) and rows[1.0]["recall"] == 1.0
  with pytest.raises(ValueError, match="top_k_ratio"):
    H.topk_dilution(nll, ratios=(0.0,))


# ----------------------------------------------------------------------------
# Sweep results
# ----------------------------------------------------------------------------


def _sweep_rows(ap):
  """ap[(λ, r)] = per-seed pixel AP for category a; category b is 0.1 lower."""
  rows = []
  for (lam, r), vals in ap.items():
    for seed, v in enumerate(vals):
      for cat, off in (("a", 0.0), ("b", -0.1)):
        rows.append({"category": cat, "tail_weight": lam, "top_k_ratio": r, "learning_rate": 1e-3,
                     "seed": seed, "metrics": {"pixel_ap": v + off, "image_auroc": 0.9}})
  return rows


def test_load_sweep_rows_and_summary(tmp_path):
  rows = _sweep_rows({(0.7, 0.02): [0.5, 0.6], (0.7, 0.1): [0.3, 0.35], (0.0, 0.02): [0.4, 0.42]})
  (tmp_path / "s").mkdir()
  (tmp_path / "s" / "results.json").write_text(json.dumps({"rows": rows}))
  loaded = H.load_sweep_rows([tmp_path / "s"])
  assert len(loaded) == len(rows) and loaded[0]["source"].endswith("results.json")
  summ = H.sweep_summary(loaded, ["a", "b"])
  e = next(x for x in summ if x["tail_weight"] == 0.7 and x["top_k_ratio"] == 0.02)
  assert e["values"] == pytest.approx([0.45, 0.55]) and e["n"] == 2
  only_a = H.sweep_summary(loaded, ["a"])
  assert next(x for x in only_a if x["top_k_ratio"] == 0.1)["mean"] == pytest.approx(0.325)
  assert [x["top_k_ratio"] for x in H.sweep_axis(summ, "top_k_ratio", 0.7)] == [0.02, 0.1]
  assert [x["tail_weight"] for x in H.sweep_axis(summ, "tail_weight", 0.02)] == [0.0, 0.7]


def test_sweep_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="results.json"):
    H.load_sweep_rows([tmp_path])
  bad = tmp_path / "results.json"
  bad.write_text(json.dumps({"rows": [{"category": "a", "seed": 0}]}))
  with pytest.raises(ValueError, match=r"results.json rows\[0\] lacks"):
    H.load_sweep_rows([tmp_path])
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    H.load_sweep_rows([bad])


# ----------------------------------------------------------------------------
# Verdict rules
# ----------------------------------------------------------------------------


def _h1(ratio, p, diff=None):
  d = (ratio - 1) if diff is None else diff
  return {"image_level": {"sobel": {"median_ratio": ratio, "wilcoxon_p": p, "n_images": 30,
                                    "n_positive": 20, "diff": {"mean": d}}}}


def test_verdict_h1_rules():
  assert H.verdict_h1(_h1(1.10, 0.009))[0] == H.SUPPORTED
  assert H.verdict_h1(_h1(1.09, 1e-9))[0] == H.PARTIAL         # significant but small
  assert H.verdict_h1(_h1(1.5, 0.02))[0] == H.PARTIAL          # large but only p < 0.05
  assert H.verdict_h1(_h1(1.01, 0.052))[0] == H.NOT_SUPPORTED   # the study's numbers
  assert H.verdict_h1(_h1(0.8, 1e-9))[0] == H.NOT_SUPPORTED     # tail patches are smoother
  assert H.verdict_h1({})[0] == H.NOT_TESTED
  assert "Wilcoxon" in H.verdict_h1(_h1(1.2, 1e-3))[1]


def _l1(share, null, lo, hi):
  return {"share": share, "null": null, "n_images": 32, "beyond": lo > 0,
          "excess": {"mean": share - null, "lo": lo, "hi": hi}}


def test_verdict_h3_rules_separate_construction_from_data():
  assert H.verdict_h3(_l1(0.87, 0.706, 0.12, 0.2), 0.7)[0] == H.SUPPORTED
  v, ev = H.verdict_h3(_l1(0.71, 0.706, -0.01, 0.02), 0.7)
  assert v == H.PARTIAL and "by construction" in ev           # the formula's concentration
  assert H.verdict_h3(_l1(0.3, 0.706, -0.5, -0.3), 0.7)[0] == H.NOT_SUPPORTED
  assert H.verdict_h3(_l1(float("nan"), 0.706, np.nan, np.nan), 0.7)[0] == H.NOT_TESTED


def _dilution(eff_run, eff_large):
  return {"rows": [{"ratio": 0.02, "effective": eff_run}, {"ratio": 0.1, "effective": eff_large}]}


def _axis(run_vals, large_vals):
  mk = lambda r, v: {"top_k_ratio": r, "values": v, "mean": float(np.mean(v))}
  return [mk(0.02, run_vals), mk(0.1, large_vals), mk(0.5, [x - 0.05 for x in large_vals])]


def test_performance_drop_and_verdict_h4_rules():
  strong = H.performance_drop(_axis([0.55, 0.56, 0.57], [0.45, 0.46, 0.44]), 0.02)
  assert strong["holds"] and strong["best_large_ratio"] == 0.1 and strong["p"] < 0.05
  noisy = H.performance_drop(_axis([0.55, 0.40], [0.45, 0.50]), 0.02)
  assert noisy["above_all_large"] and not noisy["holds"]
  one_seed = H.performance_drop(_axis([0.9], [0.1]), 0.02)
  assert one_seed["p"] is None and not one_seed["holds"]     # no test, no support
  assert H.performance_drop(_axis([0.5], [0.4])[1:], 0.02) is None

  assert H.verdict_h4(_dilution(43, 2), 0.02, strong)[0] == H.SUPPORTED
  assert H.verdict_h4(_dilution(43, 2), 0.02, noisy)[0] == H.PARTIAL
  assert H.verdict_h4(_dilution(3, 2), 0.02, strong)[0] == H.PARTIAL
  assert H.verdict_h4(_dilution(3, 2), 0.02, noisy)[0] == H.NOT_SUPPORTED
  v, ev = H.verdict_h4(_dilution(43, 2), 0.02, None)
  assert v == H.NOT_TESTED and "no sweep" in ev
  assert H.verdict_h4(_dilution(43, 2), 0.2, strong)[0] == H.NOT_TESTED


def test_verdict_h7_rules():
  cal = lambda qq, err: {"qq_corr": qq, "tail_error": err, "std": 1.0}
  assert H.verdict_h7(cal(0.995, 0.05), [0.2, 0.3], [0.1, 0.2])[0] == H.SUPPORTED
  assert H.verdict_h7(cal(0.995, 0.2), [0.3, 0.3], [0.2, 0.2])[0] == H.PARTIAL
  assert H.verdict_h7(cal(0.995, 0.05), [0.2, 0.1], [0.1, 0.2])[0] == H.PARTIAL   # not every seed
  assert H.verdict_h7(cal(0.98, 0.3), [0.4, 0.5], [0.3, 0.4])[0] == H.PARTIAL     # improves only
  assert H.verdict_h7(cal(0.9892, 0.2639), None, None)[0] == H.NOT_SUPPORTED      # the study's model
  assert H.verdict_h7(cal(0.995, 0.05), [0.2], [0.1])[0] == H.PARTIAL             # one seed: no (c)


def test_combine_verdicts():
  assert H.combine_verdicts([H.SUPPORTED, H.SUPPORTED]) == H.SUPPORTED
  assert H.combine_verdicts([H.SUPPORTED, H.NOT_SUPPORTED]) == H.PARTIAL
  assert H.combine_verdicts([H.NOT_TESTED, H.NOT_SUPPORTED]) == H.NOT_SUPPORTED
  assert H.combine_verdicts([H.NOT_TESTED]) == H.NOT_TESTED


def test_rules_state_the_thresholds():
  assert str(H.H1_SOBEL_RATIO_MIN) in H.RULES["H1"] and str(H.H7_QQ_MIN) in H.RULES["H7"]
  assert str(H.H3_SHARE_CONCENTRATED) in H.RULES["H3"] and str(H.H4_LARGE_R) in H.RULES["H4"]
