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
  bootstrap over test bags, the same resamples for every recipe, the seed ×
  test-set interaction counted once, built on the logit scale of [0, 1] for an
  AUC or share and of [−1, 1] for a difference);
* runs the chance-level checks: the "before" recipe trained on permuted
  labels, and the train/test shift of the no-learning score;

and stores each finished ratio as the unit ``ratios/<ratio>`` (a rerun reuses
it). ``mil_verdicts.answers`` applies the verdict rules below, which were fixed before
the run; ``mil_report`` gathers results and verdicts into one ``Conclusions`` and
writes ``report.md``, ``results.json`` and the figures from it in one pass.

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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import distributed
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
from tailjax.studies import mil_report
from tailjax.studies import mil_verdicts
from tailjax.studies.mil_verdicts import BASELINES
from tailjax.studies.mil_verdicts import GAIN_CANDIDATES
from tailjax.studies.mil_verdicts import NULL_RECIPE

UNIT_VERSION = 4          # bump when the per-ratio unit layout changes: a unit of another version is recomputed
FIGURE_BAGS = 8           # positive test bags whose instance weights are kept for the figure
RECIPE_KEYS = ("model", "pooling", "layer_norm", "loss", "fp_weight", "learning_rate", "epochs", "patience")

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
  """The seed + test-set interval of an arm's AUC, or of the paired difference to ``minus``."""
  v_S, rep_SxR = arm
  if minus is None:
    return stats.seed_test_interval(v_S, rep_SxR, bounds=stats.AUC_BOUNDS)
  return stats.seed_test_interval(v_S - minus[0], rep_SxR - minus[1], bounds=stats.AUC_DIFF_BOUNDS)


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
    return stats.seed_test_interval([a for a, _ in arms], np.stack([r for _, r in arms]),
                                    bounds=stats.AUC_BOUNDS)

  def top1(self, scores_SxBxN) -> dict:
    hits_SxK = np.stack([mil.top_instance_is_foreign(s_BxN[self.pos_K], self.foreign_KxN, self.mask_KxN)
                         for s_BxN in np.asarray(scores_SxBxN)])
    reps_SxR = (hits_SxK @ self.w_RxK.T) / self.w_RxK.sum(1)
    return stats.seed_test_interval(hits_SxK.mean(1), reps_SxR, bounds=stats.AUC_BOUNDS)

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
  seed, n_boot = int(config.seed), int(config.n_boot)
  info = ds.split_info(ratio)
  pos_weight = info["train"]["negatives"] / max(info["train"]["positives"], 1)
  split = dict(zip(bags_lib.SPLITS, (ds.padded(ratio, s) for s in bags_lib.SPLITS)))
  te = split["test"]
  y_B = te.labels_B.astype(np.int64)
  w_bag = stats.bootstrap_weights(y_B, n_boot, seed)          # stratified by bag label
  inst = _Instances(te, stats.bootstrap_weights(np.zeros(int(y_B.sum())), n_boot, seed + 1))
  arms: dict[str, tuple] = {}   # name -> (test AUC per seed, per bootstrap resample): the paired arms

  base = {s: _no_learning_scores(split[s], int(config.medoid_top_k)) for s in bags_lib.SPLITS}
  baselines = {}
  for name in BASELINES:
    arms[name] = _auc_arm(base["test"][name][None], y_B, w_bag)
    baselines[name] = {
        "test": _interval(arms[name]),
        "val_auc": stats.weighted_auc(stats.auc_pair_counts(base["val"][name], split["val"].labels_B))}
  instance_baseline = inst.evaluate(base["test"]["_instances"][None])
  shift = _shift_check(base, split, w_bag, n_boot, seed)

  data = bag_data(split["train"], split["val"])
  root = jax.random.PRNGKey(seed)
  keys_S = jax.vmap(lambda s: jax.random.fold_in(root, s))(jnp.arange(int(config.num_seeds)))
  trained = _train_recipes(config, ratio, recipes, data, keys_S, te, pos_weight, inst)
  for name, (arm, _) in trained.items():
    arms[name] = _auc_arm(arm, y_B, w_bag)
  recipe_results = {name: {"test": _interval(arms[name]), "test_auc": arms[name][0].tolist(), **rest}
                    for name, (_, rest) in trained.items()}

  # Paired differences (same seeds ⇒ same init, batches and dropout; same test resamples).
  for name, rec in recipe_results.items():
    rec["vs_before"] = _interval(arms[name], arms["before"])
    rec["vs_dispersion"] = _interval(arms[name], arms["dispersion"])
    rec["vs_medoid_max"] = _interval(arms[name], arms["medoid_max"])
  present = [a for a in GAIN_CANDIDATES if a in arms]
  gain_pairs = {f"{a}|{b}": _interval(arms[a], arms[b]) for a in present for b in present if a != b}

  null_logits_PxB = _permutation_logits(config, recipes, data, root, te, pos_weight)
  return {"version": UNIT_VERSION, "split_info": info, "pos_weight": pos_weight,
          "chance_top1": inst.chance_top1, "baselines": baselines, "recipes": recipe_results,
          "instance_baseline": instance_baseline, "shift": shift, "gain_pairs": gain_pairs,
          "null": {"recipe": NULL_RECIPE, "test": _interval(_auc_arm(null_logits_PxB, y_B, w_bag))}}


def _no_learning_scores(s: bags_lib.Split, top_k: int) -> dict:
  """Bag scores that need no training (dispersion; medoid distance pooled by max and
  by the top-k mean) and, under ``_instances``, the per-instance medoid distances."""
  med_BxN = np.asarray(mil.medoid_distances(s.features_BxNxD, s.mask_BxN))
  return {"dispersion": np.asarray(mil.bag_dispersion(s.features_BxNxD, s.mask_BxN)),
          "medoid_max": np.asarray(mil.top_k_mean(med_BxN, s.mask_BxN, 1)),
          "medoid_topk": np.asarray(mil.top_k_mean(med_BxN, s.mask_BxN, top_k)), "_instances": med_BxN}


def _shift_check(base: dict, split: dict, w_bag, n_boot: int, seed: int) -> dict:
  """Train/test shift of the no-learning score: it needs no training, so its AUC
  should agree across the splits up to sampling error."""
  shift = {}
  for s in bags_lib.SPLITS:
    w = w_bag if s == "test" else stats.bootstrap_weights(split[s].labels_B, n_boot, seed + 2)
    shift[s] = _interval(_auc_arm(base[s]["dispersion"][None], split[s].labels_B, w))
  diff = stats.linear_combination_interval([shift["test"], shift["train"]], [1.0, -1.0])
  return {"dispersion_auc": shift, "test_minus_train": diff, "shifted": reporting.side_of_zero(diff) != 0}


def _train_recipes(config, ratio, recipes, data, keys_S, te, pos_weight, inst) -> dict:
  """Every recipe × seed, one compiled program per model structure; identical
  hyperparameter rows (e.g. "before" and fp_sweep_2) are trained once.

  Returns ``{name: (test logits [S, B], the recipe's JSON-ready results but its test
  AUCs)}``, structure by structure, recipes in config order within each."""
  test_x, test_mask = jnp.asarray(te.features_BxNxD), jnp.asarray(te.mask_BxN)
  n_B = te.mask_BxN.sum(1)
  groups: dict[tuple, list[Recipe]] = {}
  for r in recipes:
    groups.setdefault((r.model, r.layer_norm, r.pooling), []).append(r)
  out = {}
  for (kind, ln, pooling), rs in groups.items():
    hparam_rows, row_of = [], {}
    for r in rs:
      row = r.hparam_row(pos_weight)
      k = tuple(sorted(row.items()))
      if k not in row_of:
        row_of[k] = len(hparam_rows)
        hparam_rows.append(row)
      row_of[r.name] = row_of[k]
    hp_H = make_hparams(hparam_rows, max_epochs=int(config.train.max_epochs))
    res, (logits_HxSxB, alpha_HxSxBxN, s_HxSxBxN) = jax.device_get(
        _program(config, kind, ln, pooling)(data, hp_H, keys_S, test_x, test_mask))
    if np.any(res.nonfinite):
      h, s = np.argwhere(res.nonfinite)[0]
      bad = [r.name for r in rs if row_of[r.name] == h]
      raise FloatingPointError(f"ratio {ratio}: non-finite training loss in recipe {bad} seed {s}; "
                               "training stopped there (the last finite params were kept)")
    for r in rs:
      h = row_of[r.name]
      # Attention as α·n (1 = uniform), comparable across bags of different sizes.
      weights = alpha_HxSxBxN[h] * n_B[None, :, None] if pooling == "attention" else s_HxSxBxN[h]
      out[r.name] = (logits_HxSxB[h], {
          "val_auc": res.best_val_auc[h].tolist(), "best_epoch": res.best_epoch[h].tolist(),
          "epochs_run": res.epochs_run[h].tolist(), "val_auc_history_mean": _nanmean_rows(res.val_auc_E[h]),
          "hparams": hparam_rows[h], "model": r.model, "pooling": r.pooling, "layer_norm": r.layer_norm,
          "instance": inst.evaluate(weights, s_HxSxBxN[h])})
  return out


def _permutation_logits(config, recipes, data, root, te, pos_weight) -> np.ndarray:
  """Test logits ``[P, B]`` of the chance-level check: ``NULL_RECIPE`` trained on
  permuted training and validation labels, one permutation and one seed per run.
  These models cannot have learned the labels, so their test AUC shows what chance
  looks like here."""
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
          data_P, hp, keys_P, jnp.asarray(te.features_BxNxD), jnp.asarray(te.mask_BxN)))
  return null_logits_PxB


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
    # Process 0 builds (or reads) the bags first; the others then read its cache.
    load = lambda: bags_lib.dataset_from_config(config.data, default_cache_dir=run.path("cache"))
    ds = distributed.lead_first("mil/data", load, load)
    saved = lambda r: (run.load_unit(f"ratios/{r}") or {}).get("version") == UNIT_VERSION
    computed = distributed.from_lead("mil/todo", lambda: [r for r in ds.ratios if not saved(r)])
    bar = tqdm(total=len(computed), desc="ratios", disable=not progress or not run.writer)

    def compute(r):
      t_r = time.time()
      out = diagnose_ratio(config, ds, r, recipes)
      out["elapsed_s"] = time.time() - t_r
      bar.update(1)
      return out

    # With several processes each computes its share of the ratios; process 0 saves them all.
    fresh = distributed.split_work("mil ratio", computed, compute,
                                   on_result=lambda r, v: run.save_unit(f"ratios/{r}", v))
    bar.close()
    if not run.writer:
      return {"wall_s": time.time() - t0, "computed_ratios": computed, "workdir": str(run.workdir),
              "answer_text": [f"process {distributed.process_index()}: computed its share of "
                              f"{computed}; process 0 writes the report"]}
    per_ratio = {r: fresh[r] if r in fresh else run.load_unit(f"ratios/{r}") for r in ds.ratios}
    # Units went through JSON; make fresh results look the same.
    per_ratio = {r: runrecord.to_plain(v) for r, v in per_ratio.items()}
    data_info = {k: v for k, v in ds.info.items() if k != "settings"}
    conclusions = mil_report.conclusions(config, per_ratio, mil_verdicts.answers(config, per_ratio),
                                         data_info, time.time() - t0, computed)
    results = mil_report.write(conclusions, run.workdir)
  return results
