"""Study B diagnosis: AUC intervals over seeds and test sets, recipes, config fields, run record, end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections as mlc
import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from tailjax import runrecord
from tailjax import stats
from tailjax.studies import mil_diagnosis

ROOT = Path(__file__).resolve().parents[1]


def _load_config(arg=None):
  spec = importlib.util.spec_from_file_location("mil_diagnosis_cfg", ROOT / "tailjax" / "configs" / "mil_diagnosis.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ----------------------------------------------------------------------------
# AUC with seed + test-set uncertainty
# ----------------------------------------------------------------------------


def test_pair_counts_give_sklearn_auc_and_cluster_weights_duplicate_clusters():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, 60).astype(float)            # ties
  y = rng.random(60) < 0.3
  cluster = rng.integers(0, 9, 60)                          # e.g. instances of 9 bags
  counts = stats.auc_pair_counts(scores, y, cluster, 9)
  assert stats.weighted_auc(counts) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
  # Weight w_k = repeating cluster k w_k times (the cluster bootstrap's resample).
  w = rng.integers(0, 4, 9)
  idx = np.concatenate([np.flatnonzero(cluster == k) for k in range(9) for _ in range(w[k])])
  got = stats.weighted_auc(counts, w[None].astype(float))
  assert got[0] == pytest.approx(roc_auc_score(y[idx], scores[idx]), abs=1e-12)
  # Stratified bootstrap weights keep each stratum's size.
  strata = np.r_[np.zeros(5), np.ones(7)]
  wb = stats.bootstrap_weights(strata, 50, seed=1)
  np.testing.assert_array_equal(wb[:, :5].sum(1), 5)
  np.testing.assert_array_equal(wb[:, 5:].sum(1), 7)


def _simulate(rng, mu_S, n=64, sd_bag=0.8, sd_seed_bag=0.6):
  """Scores of S models on one test set of n positive + n negative bags.

  ``s_{s,b} = μ_s·y_b + e_b + η_{s,b}``: e_b is the bag's own difficulty
  (shared by every model), η_{s,b} the model's own noise on it. Model s has
  population AUC ``Φ(μ_s / √(2(sd_bag² + sd_seed_bag²)))``.
  """
  y = np.r_[np.ones(n), np.zeros(n)]
  e = sd_bag * rng.normal(size=2 * n)
  return np.stack([m * y + e + sd_seed_bag * rng.normal(size=2 * n) for m in mu_S]), y


def test_test_set_bootstrap_interval_covers_the_true_auc_at_its_nominal_rate():
  # One model, 200 independently drawn test sets: the 95 % interval (test-set
  # component only) must cover the population AUC in >= 90 % of them.
  rng = np.random.default_rng(0)
  mu = 0.9
  true_auc = sps.norm.cdf(mu / np.sqrt(2 * (0.8 ** 2 + 0.6 ** 2)))
  covered = []
  for i in range(200):
    s, y = _simulate(rng, [mu])
    ci = stats.auc_interval(s, y, n_boot=300, seed=i)
    covered.append(ci["lo"] <= true_auc <= ci["hi"])
  assert 0.90 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_seed_plus_test_interval_covers_the_expected_auc_where_seeds_alone_do_not():
  # 5 seeds whose models differ (μ_s varies), all scored on one test set per
  # experiment. Target: the expected AUC over seeds and test sets.
  rng = np.random.default_rng(1)
  mu, tau, sd = 0.8, 0.1, np.sqrt(0.8 ** 2 + 0.6 ** 2)
  z = np.linspace(-8, 8, 4001)
  target = np.trapezoid(sps.norm.cdf((mu + tau * z) / (np.sqrt(2) * sd)) * sps.norm.pdf(z), z)
  full, seeds_only = [], []
  for i in range(200):
    s, y = _simulate(rng, mu + tau * rng.normal(size=5))
    ci = stats.auc_interval(s, y, n_boot=300, seed=i)
    full.append(ci["lo"] <= target <= ci["hi"])
    seeds_only.append(ci["seed_ci"]["lo"] <= target <= ci["seed_ci"]["hi"])
    assert ci["se"] ** 2 == pytest.approx(max(ci["se_seed"] ** 2 - ci["se_interaction"] ** 2, 0)
                                          + ci["se_test"] ** 2)
  assert np.mean(full) >= 0.90, np.mean(full)
  assert np.mean(seeds_only) < 0.75, np.mean(seeds_only)   # seeds alone miss the test-set error


def test_paired_difference_uses_the_same_resamples():
  rng = np.random.default_rng(2)
  a, y = _simulate(rng, [0.9, 1.0, 1.1])
  d = stats.auc_interval(a, y, minus_SxN=a, n_boot=200)
  assert d["mean"] == 0 and d["se"] == 0                    # an arm minus itself has no spread
  b = a + 0.3 * rng.normal(size=a.shape)
  d = stats.auc_interval(a, y, minus_SxN=b, n_boot=200)
  per_seed = [roc_auc_score(y, ai) - roc_auc_score(y, bi) for ai, bi in zip(a, b)]
  assert d["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
  alone = stats.auc_interval(a, y, n_boot=200)
  assert d["se_test"] < alone["se_test"]                    # pairing removes the shared test-set noise
  lc = stats.linear_combination_interval([alone, d], [0.5, -1.0])
  assert lc["mean"] == pytest.approx(0.5 * alone["mean"] - d["mean"])
  assert lc["se"] == pytest.approx(np.hypot(0.5 * alone["se"], d["se"]))


# ----------------------------------------------------------------------------
# Recipes and config fields
# ----------------------------------------------------------------------------


def test_recipes_map_to_losses_and_validation_names_fields():
  cfg = _load_config("smoke")
  rec = {r.name: r for r in mil_diagnosis.recipes_from_config(cfg)}
  assert rec["before"].hparam_row(pos_weight=3.0)["fp_weight"] == 2.0
  assert rec["before"].hparam_row(pos_weight=3.0)["pos_weight"] == 1.0  # WeightedBCE has none
  assert rec["loss_only"].hparam_row(pos_weight=3.0) == {**rec["before"].hparam_row(3.0), "fp_weight": 0.0,
                                                         "pos_weight": 3.0}
  assert (rec["max_after"].pooling, rec["max_after"].hparam_row(1.0)) == ("max", rec["after"].hparam_row(1.0))
  cfg.recipes.before.loss = "focal"
  with pytest.raises(ValueError, match="recipes.before.loss"):
    mil_diagnosis.recipes_from_config(cfg)
  cfg = _load_config("smoke")
  cfg.recipes.after.pooling = "mean"
  with pytest.raises(ValueError, match="recipes.after.pooling"):
    mil_diagnosis.recipes_from_config(cfg)


def test_every_config_field_is_allowed_and_an_unused_field_is_refused(tmp_path):
  for variant in (None, "smoke"):
    runrecord.check_fields(_load_config(variant), mil_diagnosis.ALLOWED_FIELDS)
  cfg = _load_config("smoke")
  cfg.train.log_every = 10            # a field nobody reads
  with pytest.raises(runrecord.ConfigFieldError, match=r"config\.train\.log_every: no stage"):
    mil_diagnosis.run_diagnosis(cfg, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()   # refused before anything was written
  cfg = _load_config("smoke")
  cfg.recipes.before.dropout = 0.5   # plausible, but recipes have no dropout
  with pytest.raises(runrecord.ConfigFieldError, match=r"recipes\.before\.dropout"):
    mil_diagnosis.run_diagnosis(cfg, tmp_path / "run", progress=False)


class Tracked:
  """A read-tracking view of a ConfigDict: records the dotted path of every leaf read.

  ``to_dict`` (used by the run record to write the manifest) does not count
  as a read.
  """

  def __init__(self, cfg, reads: set, prefix: str = ""):
    object.__setattr__(self, "_cfg", cfg)
    object.__setattr__(self, "_reads", reads)
    object.__setattr__(self, "_prefix", prefix)

  def _wrap(self, key, value):
    path = f"{self._prefix}{key}"
    if isinstance(value, (mlc.ConfigDict, dict)):
      return Tracked(value, self._reads, path + ".")
    self._reads.add(path)
    return value

  def __getattr__(self, key):
    if key.startswith("_"):
      raise AttributeError(key)
    return self._wrap(key, self._cfg[key])

  def __getitem__(self, key):
    return self._wrap(key, self._cfg[key])

  def get(self, key, default=None):
    return self._wrap(key, self._cfg[key]) if key in self._cfg else default

  def __contains__(self, key):
    return key in self._cfg

  def __iter__(self):
    return iter(self._cfg.keys())

  def keys(self):
    return self._cfg.keys()

  def items(self):
    return [(k, self._wrap(k, v)) for k, v in self._cfg.items()]

  def to_dict(self):
    return self._cfg.to_dict() if hasattr(self._cfg, "to_dict") else dict(self._cfg)


def _fields(cfg) -> set:
  return set(runrecord.flatten(runrecord.to_plain(cfg)))


def _patterns(fields) -> set:
  return {".".join("*" if i == 1 and f.startswith("recipes.") else p for i, p in enumerate(f.split(".")))
          for f in fields}


def _test_config():
  """The smoke config with fewer recipes (fewer compiled programs). Every field
  *kind* of the full config remains (recipes differ only by name)."""
  cfg = _load_config("smoke")
  keep = ("before", "after", "loss_only", "lr_only", "relation_after", "max_after")
  cfg.recipes = mlc.ConfigDict({n: cfg.recipes[n].to_dict() for n in keep})
  for n in keep:  # one layer-norm setting: fewer structures to compile
    cfg.recipes[n].layer_norm = False
  cfg.fp_sweep = [2.0]
  cfg.num_seeds = 3
  return cfg


def test_diagnosis_end_to_end_reads_every_field_resumes_and_refuses_changes(tmp_path):
  cfg = _test_config()
  cfg.data.cache_dir = str(tmp_path / "cache")
  assert _patterns(_fields(cfg)) == _patterns(_fields(_load_config("smoke"))) == _patterns(_fields(_load_config()))
  reads: set = set()
  res = mil_diagnosis.run_diagnosis(Tracked(cfg, reads), tmp_path / "run", progress=False)
  unread = _fields(cfg) - reads
  assert not unread, f"config fields never read: {sorted(unread)}"

  run = tmp_path / "run"
  report = (run / "report.md").read_text()
  for section in ("## Answers", "Does attention find the contaminants?", "## Instance level", "## Baselines and pooling",
                  "## Uncertainty components", "## Chance-level checks", "Are the below-chance cells noise?",
                  "medoid distance, max (no learning)", "max-instance pooling", "computing 2 of 2 ratios"):
    assert section in report, section
  for png in ("auc_vs_ratio.png", "attention_bags.png"):
    assert (run / png).read_bytes()[:4] == b"\x89PNG"
  manifest = json.loads((run / "manifest.json").read_text())
  assert manifest["kind"] == "mil" and sorted(p.name for p in (run / "units" / "ratios").iterdir()) == [
      "50p.json", "5p.json"]
  saved = json.loads((run / "results.json").read_text())
  cell = saved["per_ratio"]["5p"]["recipes"]["before"]
  assert len(cell["test_auc"]) == cfg.num_seeds and cell["test"]["lo"] <= cell["test"]["mean"] <= cell["test"]["hi"]
  # The combined interval is at least as wide as each component alone.
  assert cell["test"]["hi"] - cell["test"]["lo"] >= 2 * 1.95 * max(cell["test"]["se_seed"], cell["test"]["se_test"])
  ins = cell["instance"]
  assert 0 <= ins["pool_auroc"]["mean"] <= 1 and 0 <= ins["top1"]["mean"] <= 1
  assert len(ins["figure_bags"]["weights"]) == min(mil_diagnosis.FIGURE_BAGS, 16)
  assert np.allclose([np.mean(w) for w in ins["figure_bags"]["weights"]], 1.0, atol=1e-5)  # α·n, Σα = 1
  assert saved["per_ratio"]["50p"]["chance_top1"] == pytest.approx(0.5)
  assert isinstance(res["answers"]["loss"]["cause"], bool)

  # Rerun: every ratio comes from the run record, the numbers agree.
  again = mil_diagnosis.run_diagnosis(cfg, run, progress=False)
  assert again["computed_ratios"] == [] and again["per_ratio"] == res["per_ratio"]
  assert "computing 0 of 2 ratios" in (run / "report.md").read_text()
  # A changed results-relevant field is refused, naming it, before anything is touched.
  before = (run / "units" / "ratios" / "5p.json").read_bytes()
  cfg.n_boot = 300
  with pytest.raises(runrecord.ConfigMismatchError, match=r"n_boot: ran with 200, now 300"):
    mil_diagnosis.run_diagnosis(cfg, run, progress=False)
  assert (run / "units" / "ratios" / "5p.json").read_bytes() == before
