"""Study B diagnosis: recipes × seeds per contamination ratio, instance-level
evaluation, uncertainty that includes the test set, and the report.

``run_diagnosis(config, workdir)`` opens the workdir with
``runrecord.open_run`` (lock, config check, manifest), then per ratio

* scores the no-learning baselines: the study's bag dispersion, and the
  instance-level medoid distance pooled by max and by the top-k mean;
* trains every recipe × seed, one compiled program per model structure
  (``tailjax.mil_train``), and scores the test bags: bag logits, attention
  weights and instance scores;
* evaluates the instances: instance AUROC of the pooling weights (attention
  as α·n, n the bag size, so 1 = uniform; the critical-instance score for max
  pooling) and of the instance scores
  against the foreign-instance labels, on the positive test bags, and the
  fraction of positive bags whose top-weighted instance is foreign;
* attaches to every number an interval over seeds and one that adds the
  test-set sampling error (``stats.seed_test_interval``: paired cluster
  bootstrap over test bags, the same resamples for every recipe);
* runs the chance-level checks: the "before" recipe trained on permuted
  labels, and the train/test shift of the no-learning score;

and stores each finished ratio as the unit ``ratios/<ratio>`` (a rerun reuses
it). ``answers`` applies the verdict rules below, which were fixed before the
run; ``write_report`` renders ``report.md`` and the figures.

Verdict rules (each re-stated under the seed + test-set interval):

* features carry the signal: dispersion-baseline test AUC ≥
  ``baseline_threshold`` (the study's 0.70);
* "before" flat: max − min of its mean test AUC over ratios <
  ``flat_range``; with test-set error: not flat if the interval of
  AUC(largest ratio) − AUC(smallest ratio) excludes 0, flat if it lies within
  ±``flat_range``, else undetermined;
* loss weighting a cause: (BCE − WeightedBCE) interval above 0 at a majority
  of ratios;
* plain attention-MIL vs the no-learning baseline, relation model vs the
  baseline, learned pooling vs the instance-level baseline: the paired
  interval of (model − baseline) lies above / below 0; recipes are chosen by
  validation AUC, never test;
* a model "uses the contamination signal" at a ratio iff the interval of its
  instance AUROC (pooling weights) lies above 0.5 ("avoids the contaminants"
  if below);
* a below-chance cell (mean test AUC < 0.5) is noise iff its seed + test-set
  interval contains 0.5; the permutation runs must give an interval that
  contains 0.5 (else the pipeline itself is biased); the test split is
  shifted iff the interval of (test − train) dispersion-baseline AUC
  excludes 0.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import io as tio
from tailjax import mil
from tailjax import reporting
from tailjax import runrecord
from tailjax import stats
from tailjax.data import bags as bags_lib
from tailjax.data import digits as digits_lib
from tailjax.mil_train import BagData
from tailjax.mil_train import bag_data
from tailjax.mil_train import make_hparams
from tailjax.mil_train import make_train_fn
from tailjax.mil_train import model_from_config

UNIT_VERSION = 3          # bump when the per-ratio unit layout changes: old units are recomputed
FIGURE_BAGS = 8           # positive test bags whose instance weights are kept for the figure
ABLATIONS = ("loss_only", "lr_only", "epochs_only", "layer_norm_only")
GAIN_CANDIDATES = ABLATIONS + ("after",)
RECIPE_KEYS = ("model", "pooling", "layer_norm", "loss", "fp_weight", "learning_rate", "epochs", "patience")
BASELINES = ("dispersion", "medoid_max", "medoid_topk")
NULL_RECIPE = "before"

# Every config field the diagnosis reads (fnmatch patterns over dotted paths);
# anything else is refused by name (runrecord.check_fields).
ALLOWED_FIELDS = (
    "seed", "num_seeds", "fp_sweep", "baseline_threshold", "flat_range", "medoid_top_k", "n_boot",
    "permutation_runs",
    "data.source", "data.path", "data.cache_dir", "data.ratios", "data.n_bags.train", "data.n_bags.val",
    "data.n_bags.test", "data.min_bag_size", "data.max_bag_size", "data.positive_fraction",
    "data.pool_fractions", "data.seed",
    *(f"data.embedder.{f.name}" for f in dataclasses.fields(digits_lib.ArcFaceSettings)),
    "model.input_dim", "model.hidden_dim", "model.attention_dim", "model.dropout", "model.gated",
    "train.batch_size", "train.max_epochs", "train.fast_compile", "train.hparam_axis",
    *(f"recipes.*.{k}" for k in RECIPE_KEYS),
)


# ----------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  model: str
  pooling: str
  layer_norm: bool
  loss: str
  fp_weight: float
  learning_rate: float
  epochs: int
  patience: int

  def hparam_row(self, pos_weight: float) -> dict:
    weighted = self.loss == "weighted_bce"
    return {"learning_rate": self.learning_rate, "fp_weight": self.fp_weight if weighted else 0.0,
            "pos_weight": 1.0 if weighted else pos_weight, "epochs": self.epochs, "patience": self.patience}


def recipes_from_config(config) -> list[Recipe]:
  """The named recipes plus ``fp_sweep_<w>`` rows (the "before" recipe with fp_weight w)."""
  out = []
  max_epochs = int(config.train.max_epochs)
  for name, r in config.recipes.items():
    missing = [k for k in RECIPE_KEYS if k not in r]
    if missing:
      raise ValueError(f"config.recipes.{name}: missing field(s) {missing}")
    if r["loss"] not in ("weighted_bce", "bce"):
      raise ValueError(f"config.recipes.{name}.loss must be 'weighted_bce' or 'bce'; got {r['loss']!r}")
    if r["model"] not in mil.MODELS:
      raise ValueError(f"config.recipes.{name}.model must be one of {sorted(mil.MODELS)}; got {r['model']!r}")
    if r["pooling"] not in mil.POOLINGS:
      raise ValueError(f"config.recipes.{name}.pooling must be one of {list(mil.POOLINGS)}; "
                       f"got {r['pooling']!r}")
    if not 1 <= int(r["epochs"]) <= max_epochs:
      raise ValueError(f"config.recipes.{name}.epochs={r['epochs']} must lie in "
                       f"[1, train.max_epochs={max_epochs}]")
    out.append(Recipe(name, str(r["model"]), str(r["pooling"]), bool(r["layer_norm"]), str(r["loss"]),
                      float(r["fp_weight"]), float(r["learning_rate"]), int(r["epochs"]), int(r["patience"])))
  names = {r.name for r in out}
  required = {"before", "after"}
  if not required <= names:
    raise ValueError(f"config.recipes must define {sorted(required)}; got {sorted(names)}")
  before = next(r for r in out if r.name == "before")
  for w in config.fp_sweep:
    if float(w) < 0:
      raise ValueError(f"config.fp_sweep values must be >= 0; got {w}")
    out.append(dataclasses.replace(before, name=f"fp_sweep_{float(w):g}", fp_weight=float(w),
                                   loss="weighted_bce" if float(w) > 0 else "bce"))
  return out


def _validate(config) -> None:
  if int(config.num_seeds) < 2:
    raise ValueError(f"config.num_seeds must be >= 2 for intervals over seeds; got {config.num_seeds}")
  if int(config.permutation_runs) < 2:
    raise ValueError(f"config.permutation_runs must be >= 2; got {config.permutation_runs}")
  if int(config.n_boot) < 100:
    raise ValueError(f"config.n_boot must be >= 100 bootstrap resamples; got {config.n_boot}")
  if int(config.medoid_top_k) < 1:
    raise ValueError(f"config.medoid_top_k must be >= 1; got {config.medoid_top_k}")
  if config.train.hparam_axis not in ("vmap", "map"):
    raise ValueError(f"config.train.hparam_axis must be 'vmap' or 'map'; got {config.train.hparam_axis!r}")


# ----------------------------------------------------------------------------
# Compiled programs
# ----------------------------------------------------------------------------

_PROGRAMS: dict[tuple, Callable] = {}


def _program(config, kind: str, layer_norm: bool, pooling: str, *, null: bool = False):
  """One jitted program per model structure, reused across ratios (data are arguments).

  ``run(data, hparams, keys, test_x, test_mask) -> (TrainOutput without
  params, (logits, attention, instance scores) on the test bags)``. Default:
  hyperparameter rows [H] × seeds [S]; seeds are vmapped, rows vmapped
  (``train.hparam_axis='vmap'``) or mapped with ``lax.map`` (``'map'``:
  rows with short epoch budgets do not wait for long ones). ``null``: one
  hyperparameter row, and the training/validation labels vmapped together
  with the keys (one permuted labelling per run). ``train.fast_compile``
  lowers XLA's backend optimisation level (compiling dominates smoke runs).
  """
  m, t = config.model, config.train
  model_key = tuple(m[f] for f in ("input_dim", "hidden_dim", "attention_dim", "dropout", "gated"))
  bs, max_epochs = int(t.batch_size), int(t.max_epochs)
  mode, fast = str(t.hparam_axis), bool(t.fast_compile)
  key = (kind, bool(layer_norm), pooling, model_key, bs, max_epochs, mode, fast, null)
  if key not in _PROGRAMS:
    model = model_from_config(m, kind=kind, layer_norm=layer_norm, pooling=pooling)
    train_fn = make_train_fn(model, batch_size=bs, max_epochs=max_epochs)

    def run_one(data, hp, k, test_x, test_mask):
      out = train_fn(data, hp, k)
      test = model.apply(out.params, test_x, test_mask, deterministic=True, instance_scores=True)
      return out._replace(params=None), test

    if null:
      run = jax.vmap(run_one, (BagData(None, None, 0, None, None, 0), None, 0, None, None))
    else:
      run_S = jax.vmap(run_one, (None, None, 0, None, None))
      if mode == "vmap":
        run = jax.vmap(run_S, (None, 0, None, None, None))
      else:
        # Still one program, but rows run one after another: a vmapped
        # while_loop runs until its slowest member stops.
        def run(data, hp_H, keys_S, test_x, test_mask):
          return jax.lax.map(lambda hp: run_S(data, hp, keys_S, test_x, test_mask), hp_H)
    _PROGRAMS[key] = jax.jit(run, compiler_options={"xla_backend_optimization_level": 0} if fast else None)
  return _PROGRAMS[key]


# ----------------------------------------------------------------------------
# Uncertainty helpers (paired: every arm uses the same bootstrap resamples)
# ----------------------------------------------------------------------------


def _auc_arm(scores_SxB, labels_B, weights_RxB):
  """Per-seed AUC on the test set and on each bootstrap resample: (values_S, replicates_SxR)."""
  counts = [stats.auc_pair_counts(s_B, labels_B) for s_B in np.atleast_2d(scores_SxB)]
  return (np.array([stats.weighted_auc(c) for c in counts]),
          np.stack([stats.weighted_auc(c, weights_RxB) for c in counts]))


def _interval(arm, minus=None) -> dict:
  v_S, rep_SxR = arm
  if minus is not None:
    v_S, rep_SxR = v_S - minus[0], rep_SxR - minus[1]
  return stats.seed_test_interval(v_S, rep_SxR)


class _Instances:
  """Instance-level evaluation on the positive test bags (cluster bootstrap over those bags)."""

  def __init__(self, test: bags_lib.Split, weights_RxK: np.ndarray):
    self.pos_K = np.flatnonzero(test.labels_B > 0)
    self.mask_KxN = test.mask_BxN[self.pos_K]
    self.foreign_KxN = test.instance_labels_BxN[self.pos_K]
    self.w_RxK = weights_RxK
    _, self.y_I, self.bag_I = mil.flatten_instances(self.mask_KxN, self.foreign_KxN, self.mask_KxN)
    n_K = self.mask_KxN.sum(1)
    self.chance_top1 = float(np.mean((self.foreign_KxN * (self.mask_KxN > 0)).sum(1) / n_K))

  def auroc(self, scores_SxBxN) -> dict:
    arms = []
    for s_BxN in np.asarray(scores_SxBxN, np.float64):
      s_I = s_BxN[self.pos_K][self.mask_KxN > 0]
      c = stats.auc_pair_counts(s_I, self.y_I, self.bag_I, len(self.pos_K))
      arms.append((stats.weighted_auc(c), stats.weighted_auc(c, self.w_RxK)))
    return stats.seed_test_interval([a for a, _ in arms], np.stack([r for _, r in arms]))

  def top1(self, scores_SxBxN) -> dict:
    hits_SxK = np.stack([mil.top_instance_is_foreign(s_BxN[self.pos_K], self.foreign_KxN, self.mask_KxN)
                         for s_BxN in np.asarray(scores_SxBxN)])
    reps_SxR = (hits_SxK @ self.w_RxK.T) / self.w_RxK.sum(1)
    return stats.seed_test_interval(hits_SxK.mean(1), reps_SxR)

  def figure_bags(self, weights_BxN) -> dict:
    """Seed 0's weights of the first ``FIGURE_BAGS`` positive test bags (valid instances)."""
    out = {"weights": [], "foreign": []}
    for k in range(min(FIGURE_BAGS, len(self.pos_K))):
      valid = self.mask_KxN[k] > 0
      out["weights"].append(np.asarray(weights_BxN)[self.pos_K[k]][valid].tolist())
      out["foreign"].append(self.foreign_KxN[k][valid].astype(int).tolist())
    return out

  def evaluate(self, weights_SxBxN, scores_SxBxN=None) -> dict:
    out = {"pool_auroc": self.auroc(weights_SxBxN), "top1": self.top1(weights_SxBxN),
           "figure_bags": self.figure_bags(np.asarray(weights_SxBxN)[0])}
    if scores_SxBxN is not None:
      out["score_auroc"] = self.auroc(scores_SxBxN)
    return out


def _nanmean_rows(x_SxE: np.ndarray) -> list:
  """Per-epoch mean over the seeds that ran that epoch; None where none did."""
  ok = np.isfinite(x_SxE)
  n = ok.sum(0)
  m = np.where(ok, x_SxE, 0).sum(0) / np.maximum(n, 1)
  return [float(v) if c else None for v, c in zip(m, n)]


# ----------------------------------------------------------------------------
# One ratio
# ----------------------------------------------------------------------------


def diagnose_ratio(config, ds: bags_lib.BagDataset, ratio: str, recipes: Sequence[Recipe]) -> dict:
  """Baselines, every recipe × seed, instance evaluation and chance checks for one ratio (JSON-ready).

  The bootstraps are thousands of small matrix products: BLAS runs
  single-threaded here (XLA does not use it), which on a busy machine is
  orders of magnitude faster than a multi-threaded BLAS.
  """
  from threadpoolctl import threadpool_limits  # installed with scikit-learn

  with threadpool_limits(1, user_api="blas"):
    return _diagnose_ratio(config, ds, ratio, recipes)


def _diagnose_ratio(config, ds, ratio, recipes) -> dict:
  seed, n_boot, top_k = int(config.seed), int(config.n_boot), int(config.medoid_top_k)
  info = ds.split_info(ratio)
  pos_weight = info["train"]["negatives"] / max(info["train"]["positives"], 1)
  split = dict(zip(bags_lib.SPLITS, (ds.padded(ratio, s) for s in bags_lib.SPLITS)))
  te = split["test"]
  y_B = te.labels_B.astype(np.int64)
  w_bag = stats.bootstrap_weights(y_B, n_boot, seed)          # stratified by bag label
  inst = _Instances(te, stats.bootstrap_weights(np.zeros(int(y_B.sum())), n_boot, seed + 1))
  out: dict[str, Any] = {"version": UNIT_VERSION, "split_info": info, "pos_weight": pos_weight,
                         "chance_top1": inst.chance_top1, "baselines": {}, "recipes": {}}

  # No-learning scores.
  def no_learning(s: bags_lib.Split) -> dict:
    med_BxN = np.asarray(mil.medoid_distances(s.features_BxNxD, s.mask_BxN))
    return {"dispersion": np.asarray(mil.bag_dispersion(s.features_BxNxD, s.mask_BxN)),
            "medoid_max": np.asarray(mil.top_k_mean(med_BxN, s.mask_BxN, 1)),
            "medoid_topk": np.asarray(mil.top_k_mean(med_BxN, s.mask_BxN, top_k)), "_instances": med_BxN}

  base = {s: no_learning(split[s]) for s in bags_lib.SPLITS}
  arms = {}
  for name in BASELINES:
    arms[name] = _auc_arm(base["test"][name][None], y_B, w_bag)
    out["baselines"][name] = {
        "test": _interval(arms[name]),
        "val_auc": stats.weighted_auc(stats.auc_pair_counts(base["val"][name], split["val"].labels_B))}
  out["instance_baseline"] = inst.evaluate(base["test"]["_instances"][None])

  # Train/test shift of the no-learning score: it needs no training, so its
  # AUC should agree across the splits up to sampling error.
  shift = {}
  for s in bags_lib.SPLITS:
    w = w_bag if s == "test" else stats.bootstrap_weights(split[s].labels_B, n_boot, seed + 2)
    shift[s] = _interval(_auc_arm(base[s]["dispersion"][None], split[s].labels_B, w))
  diff = stats.linear_combination_interval([shift["test"], shift["train"]], [1.0, -1.0])
  out["shift"] = {"dispersion_auc": shift, "test_minus_train": diff,
                  "shifted": reporting.side_of_zero(diff) != 0}

  # Every recipe × seed; one program per model structure.
  data = bag_data(split["train"], split["val"])
  root = jax.random.PRNGKey(seed)
  keys_S = jax.vmap(lambda s: jax.random.fold_in(root, s))(jnp.arange(int(config.num_seeds)))
  test_x, test_mask = jnp.asarray(te.features_BxNxD), jnp.asarray(te.mask_BxN)
  n_B = te.mask_BxN.sum(1)
  groups: dict[tuple, list[Recipe]] = {}
  for r in recipes:
    groups.setdefault((r.model, r.layer_norm, r.pooling), []).append(r)
  for (kind, ln, pooling), rs in groups.items():
    rows, row_of = [], {}
    for r in rs:  # identical rows (e.g. "before" and fp_sweep_2) are trained once
      row = r.hparam_row(pos_weight)
      k = tuple(sorted(row.items()))
      if k not in row_of:
        row_of[k] = len(rows)
        rows.append(row)
      row_of[r.name] = row_of[k]
    hp_H = make_hparams(rows, max_epochs=int(config.train.max_epochs))
    res, (logits_HxSxB, alpha_HxSxBxN, s_HxSxBxN) = jax.device_get(
        _program(config, kind, ln, pooling)(data, hp_H, keys_S, test_x, test_mask))
    if np.any(res.nonfinite):
      h, s = np.argwhere(res.nonfinite)[0]
      bad = [r.name for r in rs if row_of[r.name] == h]
      raise FloatingPointError(f"ratio {ratio}: non-finite training loss in recipe {bad} seed {s}; "
                               "training stopped there (the last finite params were kept)")
    for r in rs:
      h = row_of[r.name]
      arms[r.name] = _auc_arm(logits_HxSxB[h], y_B, w_bag)
      # Attention as α·n (1 = uniform), comparable across bags of different sizes.
      weights = alpha_HxSxBxN[h] * n_B[None, :, None] if pooling == "attention" else s_HxSxBxN[h]
      out["recipes"][r.name] = {
          "test": _interval(arms[r.name]), "test_auc": arms[r.name][0].tolist(),
          "val_auc": res.best_val_auc[h].tolist(), "best_epoch": res.best_epoch[h].tolist(),
          "epochs_run": res.epochs_run[h].tolist(), "val_auc_history_mean": _nanmean_rows(res.val_auc_E[h]),
          "hparams": rows[h], "model": r.model, "pooling": r.pooling, "layer_norm": r.layer_norm,
          "instance": inst.evaluate(weights, s_HxSxBxN[h])}

  # Paired differences (same seeds ⇒ same init, batches and dropout; same test resamples).
  for name, rec in out["recipes"].items():
    rec["vs_before"] = _interval(arms[name], arms["before"])
    rec["vs_dispersion"] = _interval(arms[name], arms["dispersion"])
    rec["vs_medoid_max"] = _interval(arms[name], arms["medoid_max"])
  present = [a for a in GAIN_CANDIDATES if a in arms]
  out["gain_pairs"] = {f"{a}|{b}": _interval(arms[a], arms[b]) for a in present for b in present if a != b}

  # Chance-level check: "before" trained on permuted training and validation
  # labels (one permutation and one seed per run). These models cannot have
  # learned the labels, so their test AUC shows what chance looks like here.
  null_rec = next(r for r in recipes if r.name == NULL_RECIPE)
  p = int(config.permutation_runs)
  null_root = jax.random.fold_in(root, 1_000_003)
  keys_P = jax.vmap(lambda i: jax.random.fold_in(null_root, i))(jnp.arange(p))
  perm = lambda k, y: jax.random.permutation(k, y)
  data_P = data._replace(
      train_y=jax.vmap(lambda k: perm(jax.random.fold_in(k, 1), data.train_y))(keys_P),
      val_y=jax.vmap(lambda k: perm(jax.random.fold_in(k, 2), data.val_y))(keys_P))
  hp = jax.tree.map(lambda a: a[0], make_hparams([null_rec.hparam_row(pos_weight)],
                                                 max_epochs=int(config.train.max_epochs)))
  _, (null_logits_PxB, _, _) = jax.device_get(
      _program(config, null_rec.model, null_rec.layer_norm, null_rec.pooling, null=True)(
          data_P, hp, keys_P, test_x, test_mask))
  out["null"] = {"recipe": NULL_RECIPE, "test": _interval(_auc_arm(null_logits_PxB, y_B, w_bag))}
  return out


# ----------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------


def relation_choice(per_ratio: Mapping[str, dict], ratio: str) -> str | None:
  """The relation-aware attention-pooling recipe with the best mean *validation* AUC (never test)."""
  rel = {n: v for n, v in per_ratio[ratio]["recipes"].items()
         if v["model"] == "relation" and v["pooling"] == "attention"}
  if not rel:
    return None
  return max(rel, key=lambda n: (np.mean(rel[n]["val_auc"]), n))


def attention_choice(per_ratio: Mapping[str, dict], ratio: str) -> str:
  """The plain attention-MIL recipe (attention model and pooling) with the best mean validation AUC."""
  att = {n: v for n, v in per_ratio[ratio]["recipes"].items()
         if v["model"] == "attention" and v["pooling"] == "attention"}
  return max(att, key=lambda n: (np.mean(att[n]["val_auc"]), n))


def _side(ci, null: float = 0.0) -> int:
  return reporting.side_of_zero(ci, null)


def _words(side: int, above: str, below: str, neither: str) -> str:
  return {1: above, -1: below, 0: neither}[side]


def max_pool_recipes(recs: Mapping[str, dict]) -> list[str]:
  return [n for n, v in recs.items() if v["pooling"] == "max"]


def instance_models(per_ratio: Mapping[str, dict], ratio: str) -> list[str]:
  """The models whose instances the answers and the figure examine at ``ratio``:
  the study's before/after, the relation model chosen on validation, max pooling."""
  recs = per_ratio[ratio]["recipes"]
  names = ["before", "after", relation_choice(per_ratio, ratio)] + max_pool_recipes(recs)
  return [n for n in dict.fromkeys(names) if n is not None and n in recs]


def answers(config, per_ratio: Mapping[str, dict]) -> dict:
  """The verdicts, each from an explicit rule (module docstring), with and without test-set error."""
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  flat_range = float(config.flat_range)
  rec = lambda r, n: per_ratio[r]["recipes"][n]
  out: dict[str, Any] = {}

  # 1. Do the features carry the signal?
  out["baseline_rule"] = {}
  for r in ratios:
    ci = per_ratio[r]["baselines"]["dispersion"]["test"]
    out["baseline_rule"][r] = {"point": "signal" if ci["mean"] >= thr else "weak",
                               "interval": _words(_side(ci, thr), "signal", "weak", "undetermined")}

  # 2. Is "before" flat?
  before = {r: rec(r, "before")["test"] for r in ratios}
  spread = max(c["mean"] for c in before.values()) - min(c["mean"] for c in before.values())
  lo_r, hi_r = min(ratios, key=bags_lib.ratio_value), max(ratios, key=bags_lib.ratio_value)
  d = stats.linear_combination_interval([before[hi_r], before[lo_r]], [1.0, -1.0])
  flat_iv = ("not flat" if _side(d) != 0 else
             "flat" if d["lo"] > -flat_range and d["hi"] < flat_range else "undetermined")
  out["flat"] = {"spread": spread, "point": "flat" if spread < flat_range else "not flat",
                 "ends": [lo_r, hi_r], "end_difference": d, "interval": flat_iv}

  # 3. Did the loss weighting cause it?
  loss = {r: rec(r, "loss_only")["vs_before"] for r in ratios if "loss_only" in per_ratio[r]["recipes"]}
  seed_side = {r: _side(ci["seed_ci"]) for r, ci in loss.items()}
  full_side = {r: _side(ci) for r, ci in loss.items()}
  majority = lambda sides: len(sides) > 0 and sum(v > 0 for v in sides.values()) > len(sides) / 2
  out["loss"] = {"seed_side": seed_side, "side": full_side, "cause_seeds": majority(seed_side),
                 "cause": majority(full_side)}

  # 4. Is the plain attention-MIL below the no-learning baseline?
  out["attention_vs_baseline"] = {}
  for r in ratios:
    best = attention_choice(per_ratio, r)
    ci = rec(r, best)["vs_dispersion"]
    out["attention_vs_baseline"][r] = {
        "recipe": best, "test": rec(r, best)["test"], "baseline": per_ratio[r]["baselines"]["dispersion"]["test"],
        "diff": ci, "side_seeds": _side(ci["seed_ci"]), "side": _side(ci)}

  # 5. Which single change matters most? Mean over ratios (independent test sets).
  gains = {}
  for a in GAIN_CANDIDATES:
    if all(a in per_ratio[r]["recipes"] for r in ratios):
      gains[a] = stats.linear_combination_interval([rec(r, a)["vs_before"] for r in ratios],
                                                   [1.0 / len(ratios)] * len(ratios))
  out["gains"] = gains
  singles = sorted((a for a in gains if a != "after"), key=lambda a: -gains[a]["mean"])
  if len(singles) >= 2:
    best, second = singles[:2]
    diff = stats.linear_combination_interval([per_ratio[r]["gain_pairs"][f"{best}|{second}"] for r in ratios],
                                             [1.0 / len(ratios)] * len(ratios))
    out["largest_gain"] = {"best": best, "runner_up": second, "difference": diff, "clear": _side(diff) > 0}
  elif singles:
    out["largest_gain"] = {"best": singles[0], "runner_up": None, "difference": None, "clear": True}

  # 6. Does the relation-aware model beat the dispersion baseline at the smallest ratio?
  rel = relation_choice(per_ratio, lo_r)
  if rel is not None:
    ci = rec(lo_r, rel)["vs_dispersion"]
    out["relation"] = {"ratio": lo_r, "recipe": rel, "test": rec(lo_r, rel)["test"],
                       "baseline": per_ratio[lo_r]["baselines"]["dispersion"]["test"], "diff": ci,
                       "side_seeds": _side(ci["seed_ci"]), "side": _side(ci)}

  # 7. Does attention find the contaminants?
  out["instances"] = {}
  for r in ratios:
    row = {}
    for n in instance_models(per_ratio, r):
      ins = rec(r, n)["instance"]
      row[n] = {"auroc": ins["pool_auroc"], "uses": _side(ins["pool_auroc"], 0.5),
                "score_auroc": ins["score_auroc"], "top1": ins["top1"]}
    base = per_ratio[r]["instance_baseline"]
    out["instances"][r] = {"models": row, "baseline": base["pool_auroc"], "baseline_top1": base["top1"],
                           "chance_top1": per_ratio[r]["chance_top1"]}

  # 8. Learned pooling vs the instance-level no-learning score (medoid distance, max).
  out["vs_instance_baseline"] = {}
  for r in ratios:
    names = [n for n in [relation_choice(per_ratio, r)] + max_pool_recipes(per_ratio[r]["recipes"]) + ["after"]
             if n is not None and n in per_ratio[r]["recipes"]]
    out["vs_instance_baseline"][r] = {n: {"diff": rec(r, n)["vs_medoid_max"],
                                          "side": _side(rec(r, n)["vs_medoid_max"])}
                                      for n in dict.fromkeys(names)}

  # 9. Below-chance cells: noise?
  cells = []
  for r in ratios:
    for n, v in per_ratio[r]["recipes"].items():
      if v["test"]["mean"] < 0.5:
        cells.append({"ratio": r, "recipe": n, "test": v["test"], "seed_side": _side(v["test"]["seed_ci"], 0.5),
                      "side": _side(v["test"], 0.5)})
  out["below_chance"] = cells
  out["null"] = {r: {"test": per_ratio[r]["null"]["test"], "side": _side(per_ratio[r]["null"]["test"], 0.5)}
                 for r in ratios}
  out["shift"] = {r: per_ratio[r]["shift"] for r in ratios}
  return out


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

iv = reporting.interval


def ivd(ci) -> str:
  return reporting.interval(ci, signed=True)


def _both(ci, signed: bool = False) -> str:
  """``mean [seed-only CI] / [seed + test-set CI]``."""
  fmt = "+.3f" if signed else ".3f"
  return (f"{reporting.interval(ci['seed_ci'], signed=signed)} / "
          f"[{reporting.num(ci['lo'], fmt)}, {reporting.num(ci['hi'], fmt)}]")


def _answer_text(config, per_ratio, ans) -> list[str]:
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  L = []
  br = ans["baseline_rule"]
  at = lambda kind, key: [r for r in ratios if br[r][key] == kind]
  L.append(f"**Do the features carry the signal?** Rule (the study's): dispersion-baseline test AUC ≥ {thr:.2f} "
           "⇒ the embeddings carry the contamination signal and a flat model AUC is the model's/training's fault; "
           f"below ⇒ the embeddings are weak. Point estimates: signal at {', '.join(at('signal', 'point')) or 'no ratio'}"
           + (f"; weak at {', '.join(at('weak', 'point'))}" if at("weak", "point") else "")
           + f". With the test-set interval (above / below {thr:.2f}): signal at "
           f"{', '.join(at('signal', 'interval')) or 'no ratio'}; weak at {', '.join(at('weak', 'interval')) or 'no ratio'}; "
           f"undetermined at {', '.join(at('undetermined', 'interval')) or 'no ratio'}. Baseline AUCs: "
           + "; ".join(f"{r} {iv(per_ratio[r]['baselines']['dispersion']['test'])}" for r in ratios) + ".")
  fl = ans["flat"]
  b = {r: per_ratio[r]["recipes"]["before"]["test"]["mean"] for r in ratios}
  L.append(f"**Is the \"before\" AUC flat?** Rule: flat if max − min of its mean test AUC over the ratios is "
           f"< {float(config.flat_range):.2f}. Here it runs from {min(b.values()):.3f} to {max(b.values()):.3f} "
           f"(spread {fl['spread']:.3f}) ⇒ **{fl['point']}**. With test-set error: AUC({fl['ends'][1]}) − "
           f"AUC({fl['ends'][0]}) = {ivd(fl['end_difference'])}; not flat if this excludes 0, flat if it lies within "
           f"±{float(config.flat_range):.2f} ⇒ **{fl['interval']}**.")
  lo = ans["loss"]
  words = {1: "higher", -1: "lower", 0: "no detectable change"}
  per = "; ".join(f"{r}: {_both(per_ratio[r]['recipes']['loss_only']['vs_before'], True)} "
                  f"({words[lo['seed_side'][r]]} / {words[lo['side'][r]]})" for r in lo["side"])
  yn = lambda x: "YES" if x else "NO"
  L.append("**Did the loss weighting (WeightedBCE, fp_weight 2) cause the low/flat AUC?** Rule: compare \"before\" "
           "with the same recipe but plain BCE (loss only changed), paired over seeds; the weighting is a cause "
           "only if the 95 % interval of (BCE − WeightedBCE) lies above 0 at a majority of ratios. Differences "
           f"(seed-only CI / seed + test-set CI): {per}. ⇒ **{yn(lo['cause_seeds'])}** over seeds; "
           f"**{yn(lo['cause'])}** with test-set error.")
  av = ans["attention_vs_baseline"]
  cnt = lambda key, v: [r for r in ratios if av[r][key] == v]
  per = "; ".join(f"{r}: {av[r]['recipe']} {iv(av[r]['test'])} vs {iv(av[r]['baseline'])}, difference "
                  f"{_both(av[r]['diff'], True)}" for r in ratios)
  L.append("**Is the plain attention-MIL itself the bottleneck?** Rule: at each ratio take the attention-MIL recipe "
           "(attention pooling) with the best mean validation AUC; it is below the no-learning baseline if the "
           "paired interval of (model − dispersion baseline) lies below 0. Here (seed-only / seed + test-set "
           f"interval of the difference): {per} ⇒ below the baseline at {len(cnt('side_seeds', -1))} of "
           f"{len(ratios)} ratios over seeds ({', '.join(cnt('side_seeds', -1)) or 'none'}), at "
           f"{len(cnt('side', -1))} with test-set error ({', '.join(cnt('side', -1)) or 'none'}).")
  g = ans["gains"]
  if g:
    txt = "; ".join(f"{k} {ivd(v)}" for k, v in g.items())
    lg = ans.get("largest_gain")
    tail = ""
    if lg and lg["runner_up"]:
      tail = (f" The largest single-change gain is **{lg['best']}**; its lead over {lg['runner_up']} is "
              f"{ivd(lg['difference'])} ⇒ **{'clear' if lg['clear'] else 'not distinguishable'}** with test-set error.")
    L.append("**Which single change matters most?** Mean paired gain over \"before\" across ratios (seed + "
             f"test-set interval; ratios have independent test sets): {txt}.{tail}")
  if "relation" in ans:
    rr = ans["relation"]
    v = lambda s: {1: "YES", -1: "NO (it is worse)", 0: "NO (not shown)"}[s]
    L.append(f"**Did the relation-aware model beat the dispersion baseline at {rr['ratio']}?** Rule: yes only if "
             "the paired interval of (model − baseline) lies above 0; the relation recipe is chosen by validation "
             f"AUC. Chosen: {rr['recipe']}; test AUC {iv(rr['test'])} vs baseline {iv(rr['baseline'])}; difference "
             f"{_both(rr['diff'], True)} ⇒ **{v(rr['side_seeds'])}** over seeds, **{v(rr['side'])}** with test-set error.")
  L.append(_contaminant_answer(per_ratio, ans))
  vi = ans["vs_instance_baseline"]
  per = "; ".join(f"{r}: " + ", ".join(f"{n} {ivd(x['diff'])} "
                                      f"({_words(x['side'], 'beats', 'worse', 'level')})" for n, x in vi[r].items())
                  for r in ratios)
  L.append("**Does learned pooling beat the instance-level no-learning score?** Rule: model − (medoid distance, "
           "max) paired interval (seed + test set) above 0 ⇒ beats, below ⇒ worse, else level; relation recipe "
           f"chosen on validation. Here: {per}.")
  L.append(_below_chance_answer(per_ratio, ans))
  return L


def _contaminant_answer(per_ratio, ans) -> str:
  ratios = list(per_ratio)
  mark = {1: "uses", -1: "avoids", 0: "not shown"}
  parts = []
  for r in ratios:
    a = ans["instances"][r]
    models = "; ".join(f"{n} {iv(m['auroc'])} ({mark[m['uses']]}), top-1 foreign "
                       f"{100 * m['top1']['mean']:.0f} %" for n, m in a["models"].items())
    parts.append(f"{r}: {models}; medoid distance (no learning) {iv(a['baseline'])}, top-1 "
                 f"{100 * a['baseline_top1']['mean']:.0f} %; chance top-1 {100 * a['chance_top1']:.0f} %")
  uses = {n: [r for r in ratios if n in ans["instances"][r]["models"]
              and ans["instances"][r]["models"][n]["uses"] > 0] for n in ("before", "after")}
  seed_claim = ("refuted" if uses["before"] else "not refuted")
  half = [r for r in ratios if bags_lib.ratio_value(r) >= 0.5]
  caveat = (f" At {', '.join(half)} a positive bag holds as many \"foreign\" instances as native ones, so which "
            "identity is foreign is arbitrary and a relation-based score cannot exceed 0.5 there (the no-learning "
            "medoid distance shows it): the instance verdict is informative only below 50 %." if half else "")
  return ("**Does attention find the contaminants?** Rule (fixed before the run): a model \"uses the contamination "
          "signal\" at a ratio iff the seed + test-set interval of its instance AUROC — pooling weights (attention "
          "α·n; the critical-instance score for max pooling) against the foreign-instance labels, over the valid "
          "instances of the positive test bags — lies above 0.5 (\"avoids\" if below). Top-1 foreign: share of "
          f"positive test bags whose highest-weighted instance is foreign. Per ratio: {' | '.join(parts)}. "
          f"\"before\" uses the signal at {', '.join(uses['before']) or 'no ratio'}, \"after\" at "
          f"{', '.join(uses['after']) or 'no ratio'}: the seed's diagnosis \"the model is not using the "
          f"contamination signal\" is **{seed_claim}** for the study's model"
          + (f" (at {', '.join(uses['before'])})" if uses["before"] else "") + "." + caveat)


def _below_chance_answer(per_ratio, ans) -> str:
  cells = ans["below_chance"]
  null_bad = [r for r, v in ans["null"].items() if v["side"] != 0]
  shifted = [r for r, v in ans["shift"].items() if v["shifted"]]
  noise = [c for c in cells if c["side"] == 0]
  real = [c for c in cells if c["side"] < 0]
  fmt = lambda c: f"{c['recipe']}@{c['ratio']} {iv(c['test']['seed_ci'])} → {iv(c['test'])}"
  null_txt = "; ".join(f"{r} {iv(v['test'])}" for r, v in ans["null"].items())
  shift_txt = "; ".join(f"{r} {ivd(v['test_minus_train'])}" for r, v in ans["shift"].items())
  txt = ("**Are the below-chance cells noise?** Rule: a cell with mean test AUC < 0.5 is noise iff its seed + "
         "test-set interval contains 0.5; the check is trusted only if the label-permutation runs (\"before\" "
         "trained on permuted labels) give intervals containing 0.5, and a test split is shifted iff the "
         "interval of (test − train) dispersion-baseline AUC excludes 0. ")
  if not cells:
    txt += "No cell is below 0.5. "
  else:
    txt += (f"{len(cells)} cell(s) below 0.5 (seed-only CI → seed + test-set CI): "
            f"{', '.join(fmt(c) for c in cells)}. Over seeds alone "
            f"{sum(c['seed_side'] < 0 for c in cells)} of them exclude 0.5; with test-set error "
            f"{len(real)} do ({', '.join(fmt(c) for c in real) or 'none'}) ⇒ "
            f"**{len(noise)} of {len(cells)} are noise**. ")
  txt += (f"Permutation runs: {null_txt} ⇒ "
          + (f"**biased at {', '.join(null_bad)}**" if null_bad else "**all contain 0.5**")
          + f". Shift (test − train dispersion AUC): {shift_txt} ⇒ "
          + (f"**shifted at {', '.join(shifted)}**." if shifted else "**no shift detected**."))
  return txt


def _recipe_rows(recs: Mapping[str, dict]) -> list[str]:
  main = ["before", "after"] + [a for a in ABLATIONS if a in recs]
  main += [n for n in recs if n not in main and not n.startswith("fp_sweep_")]
  return main


def _figure_auc(config, per_ratio, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratios = list(per_ratio)
  xs = [100 * bags_lib.ratio_value(r) for r in ratios]
  fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 6.4))
  cmap = plt.get_cmap("tab10")

  def line(a, cis, off, **kw):
    y = [c["mean"] for c in cis]
    err = np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
    a.errorbar([x + off for x in xs], y, yerr=np.nan_to_num(err), capsize=3, ms=4, **kw)

  for i, (name, style) in enumerate([("dispersion", "k--o"), ("medoid_max", "k-.s"), ("medoid_topk", "k:^")]):
    line(ax, [per_ratio[r]["baselines"][name]["test"] for r in ratios], 0.0, fmt=style, lw=1.6,
         label=_baseline_label(config, name))
  ax.axhline(float(config.baseline_threshold), color="grey", lw=0.8, ls=":")
  recs = per_ratio[ratios[0]]["recipes"]
  names = [n for n in _recipe_rows(recs) if recs[n]["model"] == "attention" or recs[n]["pooling"] == "max"]
  styles = {"before": ("tab:red", 2.2), "after": ("tab:green", 2.2)}
  for i, n in enumerate(names):
    color, lw = styles.get(n, (cmap((3 + i) % 10), 1.2))
    line(ax, [per_ratio[r]["recipes"][n]["test"] for r in ratios], 0.3 * (i - len(names) / 2), color=color,
         lw=lw, marker="o", ls="-" if n in styles else "--", label=n)
  rel = [relation_choice(per_ratio, r) for r in ratios]
  if all(rel):
    line(ax, [per_ratio[r]["recipes"][n]["test"] for r, n in zip(ratios, rel)], 0.0, color="tab:blue", lw=2.2,
         marker="s", label="relation-aware (recipe chosen on val)")
  ax.set(xlabel="contamination ratio p (%)", ylabel="bag test ROC AUC (95 % interval: seeds + test set)",
         title="Bag-level test AUC", xticks=xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)

  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in recs if n.startswith("fp_sweep_"))
  for i, r in enumerate(ratios):
    cis = [per_ratio[r]["recipes"][n]["test"] for _, n in sweep]
    off = 0.03 * (i - (len(ratios) - 1) / 2)
    err = np.array([[c["mean"] - c["lo"] for c in cis], [c["hi"] - c["mean"] for c in cis]])
    ax2.errorbar([w + off for w, _ in sweep], [c["mean"] for c in cis], yerr=np.nan_to_num(err), marker="o",
                 ms=4, capsize=3, color=cmap(i % 10), label=r)
  ax2.set(xlabel="fp_weight (negatives' loss × (1 + fp_weight))", ylabel="bag test ROC AUC",
          title="\"before\" recipe, fp_weight sweep", xticks=[w for w, _ in sweep])
  ax2.grid(alpha=0.3)
  ax2.legend(title="ratio", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, frameon=False)

  line(ax3, [per_ratio[r]["instance_baseline"]["pool_auroc"] for r in ratios], 0.0, fmt="k--o", lw=1.6,
       label="medoid distance (no learning)")
  for i, n in enumerate(["before", "after"] + max_pool_recipes(recs)):
    if all(n in per_ratio[r]["recipes"] for r in ratios):
      line(ax3, [per_ratio[r]["recipes"][n]["instance"]["pool_auroc"] for r in ratios], 0.3 * (i - 1),
           color=styles.get(n, (cmap((6 + i) % 10), 0))[0], marker="o", lw=1.6, label=n)
  if all(rel):
    line(ax3, [per_ratio[r]["recipes"][n]["instance"]["pool_auroc"] for r, n in zip(ratios, rel)], 0.0,
         color="tab:blue", marker="s", lw=2.2, label="relation-aware (chosen on val)")
  ax3.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax3.set(xlabel="contamination ratio p (%)", ylabel="instance AUROC of pooling weights vs foreign labels",
          title="Does attention find the contaminants? (positive test bags)", xticks=xs)
  ax3.grid(alpha=0.3)
  ax3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def _figure_attention(per_ratio, path: Path) -> None:
  """Instance weights of the first positive test bags (seed 0), foreign instances in red."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratios = list(per_ratio)
  rows = (["medoid distance (no learning)", "before", "after", "relation (chosen on val)"]
          + max_pool_recipes(per_ratio[ratios[0]]["recipes"]))
  fig, axes = plt.subplots(len(rows), len(ratios), figsize=(3.2 * len(ratios), 2.0 * len(rows)), squeeze=False)
  for j, r in enumerate(ratios):
    recs = per_ratio[r]["recipes"]
    for i, row in enumerate(rows):
      ax = axes[i, j]
      if row.startswith("medoid"):
        fb, ylab, label = per_ratio[r]["instance_baseline"]["figure_bags"], "distance", row
      else:
        n = relation_choice(per_ratio, r) if row.startswith("relation (") else row
        if n is None or n not in recs:
          ax.axis("off")
          continue
        fb = recs[n]["instance"]["figure_bags"]
        ylab = "α·n (1 = uniform)" if recs[n]["pooling"] == "attention" else "instance score s"
        label = row if n == row else f"{row}: {n}"
      for b, (w, f) in enumerate(zip(fb["weights"], fb["foreign"])):
        w, f = np.asarray(w), np.asarray(f) > 0
        jit = np.linspace(-0.25, 0.25, len(w))
        ax.scatter(b + jit[~f], w[~f], s=9, color="0.55", lw=0)
        ax.scatter(b + jit[f], w[f], s=22, color="tab:red", marker="D", lw=0)
      if ylab.startswith("α"):
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
      ax.set_xticks(range(len(fb["weights"])))
      ax.tick_params(labelsize=6)
      ax.set_title(f"{r} — {label}" if i else f"{r}\n{label}", fontsize=7)
      if j == 0:
        ax.set_ylabel(ylab, fontsize=7)
      if i == len(rows) - 1:
        ax.set_xlabel("positive test bag", fontsize=7)
  fig.suptitle("Instance weights in the first positive test bags (seed 0); red diamonds = foreign instances",
               fontsize=10)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def _baseline_label(config, name: str) -> str:
  return {"dispersion": "dispersion (no learning)", "medoid_max": "medoid distance, max (no learning)",
          "medoid_topk": f"medoid distance, top-{int(config.medoid_top_k)} mean (no learning)"}[name]


def write_report(config, per_ratio: Mapping[str, dict], ans: dict, data_info: dict, workdir: Path,
                 wall_s: float, computed: Sequence[str] = ()) -> str:
  """Renders report.md (answers, tables, figures) and returns its text."""
  ratios = list(per_ratio)
  recs = per_ratio[ratios[0]]["recipes"]
  main = _recipe_rows(recs)
  hdr = ["recipe"] + ratios
  L = ["# Study B diagnosis: attention-MIL on contaminated identity bags", ""]
  L.append(f"Seeds per cell: {int(config.num_seeds)}. Unless said otherwise a cell is the mean test ROC AUC over "
           "seeds with a 95 % interval that combines the seed spread and the test-set sampling error "
           "(`stats.seed_test_interval`: se² = se_seed² + se_test², se_test from "
           f"{int(config.n_boot)} bootstrap resamples of the test bags stratified by label — the same resamples "
           "for every recipe, so differences are paired — Welch–Satterthwaite t). Intervals are not clipped to "
           "[0, 1]. All recipes share each seed's initialisation, batch order and dropout masks. Wall time of "
           f"this invocation: {wall_s:.0f} s, computing {len(computed)} of {len(ratios)} ratios (the rest "
           "reused from the run record); time per ratio when computed: "
           + ", ".join(f"{r} {per_ratio[r].get('elapsed_s', float('nan')):.0f} s" for r in ratios) + ".")
  L += ["", "## Answers", ""]
  L += reporting.bullets(_answer_text(config, per_ratio, ans))
  L += ["", "## Test AUC per ratio (bag level: no-learning baselines and learned pooling)", ""]
  rows = [[_baseline_label(config, b)] + [iv(per_ratio[r]["baselines"][b]["test"]) for r in ratios]
          for b in BASELINES]
  rows += [[n] + [iv(per_ratio[r]["recipes"][n]["test"]) for r in ratios] for n in main]
  L += reporting.table(hdr, rows)
  L += ["", "![AUC vs contamination ratio](auc_vs_ratio.png)", ""]

  L += ["## Baselines and pooling", "",
        "The same test bags; \"− dispersion\" is the paired difference to the study's no-learning baseline "
        "(seed + test-set interval). Attention pooling (Ilse et al.), max-instance pooling (DSMIL's critical "
        "instance: bag logit = max instance score) and the instance-level no-learning score (each instance's "
        "cosine distance to its bag's medoid, bag score = max or top-k mean).", ""]
  pooling_name = {"attention": "attention pooling", "max": "max-instance pooling"}
  pool_rows = [(b, None) for b in BASELINES] + [
      (n, f"{pooling_name[recs[n]['pooling']]}, {recs[n]['model']} model ({n})")
      for n in ["after", "relation_after"] + max_pool_recipes(recs) if n in recs]
  rows = []
  for key, label in pool_rows:
    if label is None:
      rows.append([_baseline_label(config, key)] + [iv(per_ratio[r]["baselines"][key]["test"]) for r in ratios])
    elif key in recs:
      rows.append([label] + [iv(per_ratio[r]["recipes"][key]["test"]) for r in ratios])
      rows.append([f"{label} − dispersion"] + [ivd(per_ratio[r]["recipes"][key]["vs_dispersion"]) for r in ratios])
  L += reporting.table(hdr, rows)
  L.append("")

  L += ["## Instance level: does attention find the contaminants?", "",
        "Instance AUROC over the valid instances of the positive test bags, foreign = positive; interval over "
        "seeds + a cluster bootstrap over positive test bags. *Pooling weights*: attention α·n (the critical-"
        "instance score for max pooling); *instance scores*: the classifier applied to each instance, "
        "s_i = cᵀh_i + b (for attention pooling the bag logit is Σ α_i s_i). Rule: uses the contamination signal "
        "iff the interval lies above 0.5. At 50 % the two identities of a positive bag are equally many: "
        "\"foreign\" is then a label without a relation behind it, and 0.5 is expected.", ""]
  rows = [["medoid distance (no learning)"] + [iv(per_ratio[r]["instance_baseline"]["pool_auroc"]) for r in ratios]]
  for n in main:
    rows.append([f"{n}: pooling weights"] + [iv(per_ratio[r]["recipes"][n]["instance"]["pool_auroc"])
                                             for r in ratios])
  for n in main:
    if recs[n]["model"] == "relation" or recs[n]["pooling"] == "max" or n in ("before", "after"):
      rows.append([f"{n}: instance scores"] + [iv(per_ratio[r]["recipes"][n]["instance"]["score_auroc"])
                                               for r in ratios])
  L += reporting.table(["instance AUROC"] + ratios, rows)
  L += ["", "Share of positive test bags whose highest-weighted instance is foreign (chance = mean foreign "
        "fraction of a bag):", ""]
  pct = lambda c: reporting.interval(c, scale=100, digits=0)
  rows = [["chance"] + [f"{100 * per_ratio[r]['chance_top1']:.0f}" for r in ratios],
          ["medoid distance (no learning)"] + [pct(per_ratio[r]["instance_baseline"]["top1"]) for r in ratios]]
  rows += [[n] + [pct(per_ratio[r]["recipes"][n]["instance"]["top1"]) for r in ratios] for n in main]
  L += reporting.table(["top-1 foreign (%)"] + ratios, rows)
  L += ["", "![attention vs instance label](attention_bags.png)", ""]

  L += ["## Paired difference vs \"before\"", "",
        "Cells: mean [seed-only t-interval] / [seed + test-set interval].", ""]
  L += reporting.table(hdr, [[f"{n} − before"] + [_both(per_ratio[r]["recipes"][n]["vs_before"], True)
                                                  for r in ratios] for n in main[1:]])
  L.append("")
  L += ["## Uncertainty components", "",
        "Standard errors of each test-AUC cell: seed / test set (bootstrap over test bags). Where the test-set "
        "term dominates, an interval over seeds alone is too narrow.", ""]
  se = lambda c: f"{reporting.num(c['se_seed'], '.3f')} / {reporting.num(c['se_test'], '.3f')}"
  rows = [[_baseline_label(config, b)] + [se(per_ratio[r]["baselines"][b]["test"]) for r in ratios]
          for b in BASELINES]
  rows += [[n] + [se(per_ratio[r]["recipes"][n]["test"]) for r in ratios] for n in main]
  L += reporting.table(hdr, rows)
  L.append("")

  L += ["## Chance-level checks", "",
        f"*Permutation runs*: the \"{NULL_RECIPE}\" recipe trained on permuted training and validation labels "
        f"({int(config.permutation_runs)} runs, one permutation and seed each); *shift*: the dispersion "
        "baseline's AUC on each split's bags (it needs no training, so the splits should agree).", ""]
  rows = [["permutation runs: test AUC"] + [iv(per_ratio[r]["null"]["test"]) for r in ratios]]
  for s in bags_lib.SPLITS:
    rows.append([f"dispersion AUC, {s} bags"] + [iv(per_ratio[r]["shift"]["dispersion_auc"][s]) for r in ratios])
  rows.append(["test − train"] + [ivd(per_ratio[r]["shift"]["test_minus_train"]) for r in ratios])
  L += reporting.table(["check"] + ratios, rows)
  L.append("")

  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in recs if n.startswith("fp_sweep_"))
  if sweep:
    L += ["## fp_weight sweep (\"before\" recipe, only fp_weight changed; 0 = plain BCE)", ""]
    L += reporting.table(["fp_weight"] + ratios, [[f"{w:g}"] + [iv(per_ratio[r]["recipes"][n]["test"])
                                                               for r in ratios] for w, n in sweep])
    L.append("")
  L.append("Verdict rules were fixed before the run (module docstring of `tailjax/studies/mil_diagnosis.py`); "
           "recipes are chosen on validation AUC; nothing was tuned on the test set.")
  L += ["", "## Recipes", ""]
  rows = []
  for n, v in recs.items():
    h = v["hparams"]
    loss = "WeightedBCE" if h["fp_weight"] > 0 else f"BCE (pos_weight {h['pos_weight']:.2f})"
    rows.append([n, v["model"], v["pooling"], v["layer_norm"], loss, f"{h['fp_weight']:g}",
                 f"{h['learning_rate']:g}", h["epochs"], h["patience"], f"{np.mean(v['epochs_run']):.1f}"])
  L += reporting.table(["recipe", "model", "pooling", "LayerNorm", "loss", "fp_weight", "lr", "epochs",
                        "patience", "mean epochs run (first ratio)"], rows)
  L += ["", "## Data", ""]
  L.append(f"Source: {data_info.get('source', '?')}. Bag size {data_info.get('bag_size')}, positive fraction "
           f"{data_info.get('positive_fraction')}, instance pools (split before bagging) "
           f"{data_info.get('pool_sizes')}.")
  q = data_info.get("heldout_quality")
  if q:
    L.append(f"Bag identities {q['identities']}: mean cosine within identity {q['intra_cos']:.3f}, between "
             f"{q['inter_cos']:.3f}; leave-one-out nearest-centroid identity accuracy {q['ncc_accuracy']:.3f}.")
  L.append("")
  rows = []
  for r in ratios:
    si = per_ratio[r]["split_info"]
    rows.append([r] + [f"{si[s]['count']}/{si[s]['positives']}" for s in bags_lib.SPLITS]
                + [reporting.num(per_ratio[r]["baselines"]["dispersion"]["val_auc"], ".3f")])
  L += reporting.table(["ratio"] + [f"{s} count/positives" for s in bags_lib.SPLITS] + ["val AUC baseline"], rows)
  return reporting.write_markdown(workdir / "report.md", L)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def run_diagnosis(config, workdir: str | Path, *, progress: bool = True, on_change: str = "error") -> dict:
  """The full study-B diagnosis in ``workdir``; returns the results (also ``results.json``).

  The workdir is opened with ``runrecord.open_run`` (kind "mil"): a second
  process is refused, a changed results-relevant config is refused naming the
  fields (``on_change``: "restart" / "branch"), and an unknown config field is
  refused naming it. Each finished ratio is the unit ``ratios/<ratio>``; a
  rerun reuses it, so a killed run resumes where it stopped.
  """
  from tqdm import tqdm

  t0 = time.time()
  with runrecord.open_run(workdir, config, kind="mil", on_change=on_change,
                          allowed_fields=ALLOWED_FIELDS) as run:
    _validate(config)
    recipes = recipes_from_config(config)
    ds = bags_lib.dataset_from_config(config.data, default_cache_dir=run.path("cache"))
    per_ratio, computed = {}, []
    for r in tqdm(ds.ratios, desc="ratios", disable=not progress):
      unit = run.load_unit(f"ratios/{r}")
      if unit is not None and unit.get("version") == UNIT_VERSION:
        per_ratio[r] = unit
        continue
      t_r = time.time()
      per_ratio[r] = diagnose_ratio(config, ds, r, recipes)
      per_ratio[r]["elapsed_s"] = time.time() - t_r
      computed.append(r)
      run.save_unit(f"ratios/{r}", per_ratio[r])
    # Units went through JSON; make fresh results look the same.
    per_ratio = {r: runrecord.to_plain(v) for r, v in per_ratio.items()}
    ans = answers(config, per_ratio)
    data_info = {k: v for k, v in ds.info.items() if k != "settings"}
    text = _answer_text(config, per_ratio, ans)
    _figure_auc(config, per_ratio, run.path("auc_vs_ratio.png"))
    _figure_attention(per_ratio, run.path("attention_bags.png"))
    wall = time.time() - t0
    write_report(config, per_ratio, ans, data_info, run.workdir, wall, computed)
    results = {"wall_s": wall, "computed_ratios": computed, "answers": ans, "per_ratio": per_ratio,
               "data": data_info, "answer_text": text, "workdir": str(run.workdir)}
    tio.atomic_write_json(run.path("results.json"), results)
  return results
