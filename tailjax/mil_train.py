"""Study B: training attention-MIL with in-graph early stopping, and the diagnosis run.

Training is one pure function. ``make_train_fn(model, ...)`` returns
``train_fn(data, hparams, key)``; ``make_train(config, data)`` closes over the
data and returns the vmappable ``train(hparams, key)``, so

    sweep = jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))
    out_HxS = sweep(hparams_H, keys_S)

trains every hyperparameter row × seed as ONE compiled program. The swept
values are arrays (``HParams``): learning rate (via
``optax.inject_hyperparams``), ``fp_weight``, ``pos_weight`` and the integer
``epochs`` and ``patience``. Epochs run in a ``lax.while_loop`` bounded by
the static ``max_epochs``; a row's loop body is a no-op once its own epoch
budget is spent or it has stopped early (under ``vmap`` the loop runs until
every row is done, and finished rows keep their state). Each epoch shuffles
the training bags with ``fold_in(key, epoch)`` and draws dropout with
``fold_in(key, step)``; after each epoch the validation AUC (rank-sum
formula, ``rank_auc``) decides whether to keep a copy of the parameters
(strict improvement) and counts bad epochs; ``patience`` bad epochs in a row
stop the run. The returned parameters are the best epoch's.

``run_diagnosis(config, workdir)`` is the study's diagnosis: per
contamination ratio, the no-learning dispersion baseline, the "before" and
"after" recipes, one-change-at-a-time ablations, a relation-aware model and an
``fp_weight`` sweep, several seeds each; it writes ``results.json``,
``report.md`` and ``auc_vs_ratio.png`` to the workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tailjax import io as tio
from tailjax import losses
from tailjax import mil
from tailjax.stats import mean_ci
from tailjax.data import bags as bags_lib

# ----------------------------------------------------------------------------
# Metric and loss
# ----------------------------------------------------------------------------


def rank_auc(scores_N: jax.Array, labels_N: jax.Array) -> jax.Array:
  """ROC AUC by the Mann–Whitney rank-sum formula, ties counted as 1/2; jittable.

  ``AUC = (Σ_{i:y=1} R_i − n₊(n₊+1)/2) / (n₊ n₋)`` with ``R_i`` the 1-based
  mid-rank of score i (tied scores share the mean of their ranks, computed
  with two ``searchsorted`` calls: O(N log N)). Returns NaN when a class is
  absent or a score is NaN. Equals ``sklearn.metrics.roc_auc_score``.
  """
  scores_N = jnp.asarray(scores_N, jnp.float32)
  y_N = jnp.asarray(labels_N, jnp.float32)
  sorted_N = jnp.sort(scores_N)
  lo_N = jnp.searchsorted(sorted_N, scores_N, side="left")
  hi_N = jnp.searchsorted(sorted_N, scores_N, side="right")
  midrank_N = (lo_N + hi_N + 1).astype(jnp.float32) / 2.0
  n_pos = jnp.sum(y_N)
  n_neg = y_N.shape[0] - n_pos
  auc = (jnp.sum(y_N * midrank_N) - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
  ok = (n_pos > 0) & (n_neg > 0) & ~jnp.any(jnp.isnan(scores_N))
  return jnp.where(ok, auc, jnp.nan)


def bag_loss(logits_B, labels_B, fp_weight, pos_weight) -> jax.Array:
  """The study's two losses behind one traced switch.

  ``fp_weight > 0``: ``losses.weighted_bce`` (every negative's loss ×
  (1 + fp_weight), the study's WeightedBCE); ``fp_weight == 0``:
  ``losses.bce_with_logits`` with ``pos_weight`` (PyTorch semantics; 1 on
  balanced data, ``n_neg / n_pos`` otherwise). Combining both weights is
  rejected when the grid is built (``make_hparams``).
  """
  weighted = losses.weighted_bce(logits_B, labels_B, fp_weight)
  plain = losses.bce_with_logits(logits_B, labels_B, pos_weight)
  return jnp.where(fp_weight > 0, weighted, plain)


# ----------------------------------------------------------------------------
# Pure training function
# ----------------------------------------------------------------------------


class HParams(NamedTuple):
  """Swept hyperparameters as arrays (scalars for one run, [H] for a grid)."""
  learning_rate: Any
  fp_weight: Any
  pos_weight: Any
  epochs: Any
  patience: Any


def make_hparams(rows: Sequence[Mapping[str, float]], *, max_epochs: int | None = None) -> HParams:
  """Stacks dict rows (keys = ``HParams`` fields) into an [H] grid, validating each row.

  Errors name the row and field: lr ≤ 0, negative weights, epochs outside
  [1, max_epochs], patience < 1, or fp_weight > 0 together with pos_weight ≠ 1.
  """
  fields = HParams._fields
  cols = {f: [] for f in fields}
  for i, row in enumerate(rows):
    missing = [f for f in fields if f not in row]
    if missing:
      raise ValueError(f"hparams row {i}: missing field(s) {missing}")
    lr, fp, pw, ep, pat = (row[f] for f in fields)
    if not lr > 0:
      raise ValueError(f"hparams row {i}: learning_rate must be > 0; got {lr}")
    if not fp >= 0 or not pw > 0:
      raise ValueError(f"hparams row {i}: need fp_weight >= 0 and pos_weight > 0; got {fp}, {pw}")
    if fp > 0 and pw != 1:
      raise ValueError(f"hparams row {i}: fp_weight={fp} (WeightedBCE) with pos_weight={pw}: "
                       "the study's WeightedBCE has no pos_weight; use one or the other")
    if int(ep) < 1 or (max_epochs is not None and int(ep) > max_epochs):
      raise ValueError(f"hparams row {i}: epochs={ep} must lie in [1, max_epochs={max_epochs}]")
    if int(pat) < 1:
      raise ValueError(f"hparams row {i}: patience must be >= 1; got {pat}")
    for f in fields:
      cols[f].append(row[f])
  return HParams(
      learning_rate=jnp.asarray(cols["learning_rate"], jnp.float32),
      fp_weight=jnp.asarray(cols["fp_weight"], jnp.float32),
      pos_weight=jnp.asarray(cols["pos_weight"], jnp.float32),
      epochs=jnp.asarray(cols["epochs"], jnp.int32),
      patience=jnp.asarray(cols["patience"], jnp.int32))


class BagData(NamedTuple):
  """Padded train and validation bags (a pytree, so it can be a jit argument)."""
  train_x: jax.Array
  train_mask: jax.Array
  train_y: jax.Array
  val_x: jax.Array
  val_mask: jax.Array
  val_y: jax.Array


def bag_data(train: bags_lib.Split, val: bags_lib.Split) -> BagData:
  f = lambda a: jnp.asarray(a, jnp.float32)
  return BagData(f(train.features_BxNxD), f(train.mask_BxN), f(train.labels_B),
                 f(val.features_BxNxD), f(val.mask_BxN), f(val.labels_B))


class TrainOutput(NamedTuple):
  """What one run returns; histories have length ``max_epochs`` (NaN after the run ended)."""
  params: Any            # the best epoch's parameters
  best_epoch: jax.Array  # 0-based epoch whose params were kept (−1: none finite)
  best_val_auc: jax.Array
  epochs_run: jax.Array
  nonfinite: jax.Array   # True if a non-finite loss stopped the run
  val_auc_E: jax.Array
  train_loss_E: jax.Array


class _Carry(NamedTuple):
  epoch: jax.Array
  params: Any
  opt_state: Any
  best_params: Any
  best_auc: jax.Array
  best_epoch: jax.Array
  bad_epochs: jax.Array
  stopped: jax.Array
  nonfinite: jax.Array
  val_auc_E: jax.Array
  train_loss_E: jax.Array


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_train_fn(model: mil.AttentionMIL, *, batch_size: int, max_epochs: int
                  ) -> Callable[[BagData, HParams, jax.Array], TrainOutput]:
  """Returns the pure ``train_fn(data, hparams, key) -> TrainOutput`` (see module doc).

  Static: the model structure, ``batch_size`` and ``max_epochs``. The last
  ``n_train mod batch_size`` bags of each shuffled epoch are dropped, so every
  step has the same shape. Keys: ``key`` → (init, shuffle, dropout); epoch e
  shuffles with ``fold_in(shuffle, e)``, global step t drops out with
  ``fold_in(dropout, t)``. Rows with the same key share the initialisation,
  the batch order and the dropout masks, so recipe comparisons are paired.
  """
  if max_epochs < 1 or batch_size < 1:
    raise ValueError(f"train.max_epochs and train.batch_size must be >= 1; got {max_epochs}, {batch_size}")

  def train_fn(data: BagData, hp: HParams, key: jax.Array) -> TrainOutput:
    n_train = data.train_x.shape[0]
    bs = min(batch_size, n_train)
    steps = n_train // bs
    k_init, k_shuffle, k_dropout = jax.random.split(key, 3)
    params = model.init(k_init, data.train_x[:1], data.train_mask[:1])
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=hp.learning_rate)

    def loss_fn(p, x, m, y, k):
      logits, _ = model.apply(p, x, m, deterministic=False, rngs={"dropout": k})
      return bag_loss(logits, y, hp.fp_weight, hp.pos_weight)

    def sgd_step(state, inp):
      p, o = state
      t, idx = inp
      loss, g = jax.value_and_grad(loss_fn)(
          p, data.train_x[idx], data.train_mask[idx], data.train_y[idx], jax.random.fold_in(k_dropout, t))
      upd, o = opt.update(g, o, p)
      return (optax.apply_updates(p, upd), o), loss

    def val_auc(p):
      logits, _ = model.apply(p, data.val_x, data.val_mask, deterministic=True)
      return rank_auc(logits, data.val_y)

    def active(c: _Carry):
      return (c.epoch < max_epochs) & (c.epoch < hp.epochs) & ~c.stopped

    def epoch_body(c: _Carry) -> _Carry:
      e = c.epoch
      perm = jax.random.permutation(jax.random.fold_in(k_shuffle, e), n_train)
      idx_SxB = perm[: steps * bs].reshape(steps, bs)
      (p, o), loss_S = jax.lax.scan(sgd_step, (c.params, c.opt_state),
                                    (e * steps + jnp.arange(steps), idx_SxB))
      loss = jnp.mean(loss_S)
      finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(loss_S))
      auc = val_auc(p)
      improved = finite & (auc > c.best_auc)  # NaN AUC never improves
      bad = jnp.where(improved, 0, c.bad_epochs + 1)
      return _Carry(
          epoch=e + 1,
          # A non-finite epoch is discarded: the last good params stay.
          params=_select(finite, p, c.params),
          opt_state=_select(finite, o, c.opt_state),
          best_params=_select(improved, p, c.best_params),
          best_auc=jnp.where(improved, auc, c.best_auc),
          best_epoch=jnp.where(improved, e, c.best_epoch),
          bad_epochs=bad,
          stopped=(bad >= hp.patience) | ~finite,
          nonfinite=c.nonfinite | ~finite,
          val_auc_E=c.val_auc_E.at[e].set(auc),
          train_loss_E=c.train_loss_E.at[e].set(loss))

    nan_E = jnp.full((max_epochs,), jnp.nan, jnp.float32)
    init = _Carry(jnp.int32(0), params, opt.init(params), params, jnp.float32(-jnp.inf),
                  jnp.int32(-1), jnp.int32(0), jnp.bool_(False), jnp.bool_(False), nan_E, nan_E)
    c = jax.lax.while_loop(active, epoch_body, init)
    return TrainOutput(c.best_params, c.best_epoch, c.best_auc, c.epoch, c.nonfinite,
                       c.val_auc_E, c.train_loss_E)

  return train_fn


def model_from_config(model_cfg: Mapping[str, Any], *, kind: str, layer_norm: bool) -> mil.AttentionMIL:
  return mil.make_model(kind, input_dim=int(model_cfg["input_dim"]), hidden_dim=int(model_cfg["hidden_dim"]),
                        attention_dim=int(model_cfg["attention_dim"]), dropout=float(model_cfg["dropout"]),
                        gated=bool(model_cfg["gated"]), layer_norm=bool(layer_norm))


def make_train(config, data: BagData, *, kind: str = "attention", layer_norm: bool = False):
  """``train(hparams, key) -> TrainOutput`` for one model structure, closing over ``data``.

  ``config`` needs ``model`` (input_dim, hidden_dim, attention_dim, dropout,
  gated) and ``train`` (batch_size, max_epochs). Vmap it over hyperparameters
  and seeds: ``jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))``.
  """
  fn = make_train_fn(model_from_config(config.model, kind=kind, layer_norm=layer_norm),
                     batch_size=int(config.train.batch_size), max_epochs=int(config.train.max_epochs))
  return lambda hparams, key: fn(data, hparams, key)


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def _auc_np(scores_RxN: np.ndarray, y_N: np.ndarray) -> np.ndarray:
  """Row-wise rank-sum AUC in NumPy (for bootstraps), ties as 1/2."""
  from scipy.stats import rankdata
  r = rankdata(scores_RxN, axis=-1)
  n_pos = y_N.sum(-1)
  n_neg = y_N.shape[-1] - n_pos
  return ((r * y_N).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_auc_ci(scores_N: np.ndarray, y_N: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
  """AUC with a 95 % percentile-bootstrap CI over bags (the baseline has no seeds to vary)."""
  rng = np.random.default_rng(seed)
  idx_RxN = rng.integers(0, len(y_N), (n_boot, len(y_N)))
  y_RxN = y_N[idx_RxN]
  keep = (y_RxN.sum(1) > 0) & (y_RxN.sum(1) < len(y_N))
  auc_R = _auc_np(scores_N[idx_RxN[keep]], y_RxN[keep])
  return {"mean": float(_auc_np(scores_N[None], y_N[None])[0]), "lo": float(np.percentile(auc_R, 2.5)),
          "hi": float(np.percentile(auc_R, 97.5)), "n_boot": int(keep.sum())}


def paired_bootstrap_diff(model_scores_SxN: np.ndarray, base_scores_N: np.ndarray, y_N: np.ndarray,
                          *, n_boot: int = 1000, seed: int = 0) -> dict:
  """95 % percentile-bootstrap CI over test bags of mean_s AUC(model_s) − AUC(baseline).

  Both are scored on the same resampled bags (paired), which carries the
  test-set sampling uncertainty that a CI over seeds leaves out.
  """
  rng = np.random.default_rng(seed)
  idx_RxN = rng.integers(0, len(y_N), (n_boot, len(y_N)))
  y_RxN = y_N[idx_RxN]
  keep = (y_RxN.sum(1) > 0) & (y_RxN.sum(1) < len(y_N))
  idx_RxN, y_RxN = idx_RxN[keep], y_RxN[keep]
  base_R = _auc_np(base_scores_N[idx_RxN], y_RxN)
  model_R = np.mean([_auc_np(s[idx_RxN], y_RxN) for s in model_scores_SxN], axis=0)
  d = model_R - base_R
  return {"mean": float(d.mean()), "lo": float(np.percentile(d, 2.5)), "hi": float(np.percentile(d, 97.5)),
          "n_boot": int(len(d))}


# ----------------------------------------------------------------------------
# The diagnosis
# ----------------------------------------------------------------------------

ABLATIONS = ("loss_only", "lr_only", "epochs_only", "layer_norm_only")
_RECIPE_KEYS = ("model", "layer_norm", "loss", "fp_weight", "learning_rate", "epochs", "patience")


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  model: str
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
  for name, r in config.recipes.items():
    missing = [k for k in _RECIPE_KEYS if k not in r]
    if missing:
      raise ValueError(f"config.recipes.{name}: missing field(s) {missing}")
    if r["loss"] not in ("weighted_bce", "bce"):
      raise ValueError(f"config.recipes.{name}.loss must be 'weighted_bce' or 'bce'; got {r['loss']!r}")
    if r["model"] not in mil.MODELS:
      raise ValueError(f"config.recipes.{name}.model must be one of {sorted(mil.MODELS)}; got {r['model']!r}")
    if not 1 <= int(r["epochs"]) <= int(config.train.max_epochs):
      raise ValueError(f"config.recipes.{name}.epochs={r['epochs']} must lie in "
                       f"[1, train.max_epochs={config.train.max_epochs}]")
    out.append(Recipe(name, str(r["model"]), bool(r["layer_norm"]), str(r["loss"]), float(r["fp_weight"]),
                      float(r["learning_rate"]), int(r["epochs"]), int(r["patience"])))
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


_RESULTS_VERSION = 2  # bump when the per-ratio result layout changes: old caches are then recomputed


def _config_hash(config) -> str:
  text = f"v{_RESULTS_VERSION}:" + config.to_json(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


_SWEEPS: dict[tuple, Callable] = {}


def _sweep(config, kind: str, layer_norm: bool):
  """One jitted program per model structure, reused across ratios (data are arguments).

  ``run(data, hparams_H, keys_S, test_x, test_mask) -> (TrainOutput_HxS
  without params, test logits_HxSxB)``. Seeds are always vmapped;
  hyperparameter rows are vmapped (``train.hparam_axis='vmap'``) or mapped
  with ``lax.map`` (``'map'``, cheaper when rows have different epoch
  budgets); both give the same numbers up to float reassociation.
  ``train.fast_compile`` lowers XLA's backend optimisation level: compiling
  dominates tiny (smoke) runs.
  """
  key = (kind, layer_norm, config.model.to_json(sort_keys=True), config.train.to_json(sort_keys=True))
  if key not in _SWEEPS:
    model = model_from_config(config.model, kind=kind, layer_norm=layer_norm)
    train_fn = make_train_fn(model, batch_size=int(config.train.batch_size),
                             max_epochs=int(config.train.max_epochs))

    def run_one(data, hp, k, test_x, test_mask):
      out = train_fn(data, hp, k)
      logits_B = model.apply(out.params, test_x, test_mask, deterministic=True)[0]
      return out._replace(params=None), logits_B

    run_S = jax.vmap(run_one, (None, None, 0, None, None))
    mode = config.train.get("hparam_axis", "vmap")
    if mode == "vmap":
      run_HxS = jax.vmap(run_S, (None, 0, None, None, None))
    elif mode == "map":
      # Still one program, but rows run one after another: a vmapped
      # while_loop runs until its slowest member stops, so a 30-epoch row
      # would make every 10-epoch row pay for 30 epochs.
      def run_HxS(data, hp_H, keys_S, test_x, test_mask):
        return jax.lax.map(lambda hp: run_S(data, hp, keys_S, test_x, test_mask), hp_H)
    else:
      raise ValueError(f"train.hparam_axis must be 'vmap' or 'map'; got {mode!r}")
    opts = {"xla_backend_optimization_level": 0} if config.train.get("fast_compile", False) else None
    _SWEEPS[key] = jax.jit(run_HxS, compiler_options=opts)
  return _SWEEPS[key]


def diagnose_ratio(config, ds: bags_lib.BagDataset, ratio: str, recipes: Sequence[Recipe]) -> dict:
  """Baseline + every recipe × seed for one ratio; returns a JSON-ready dict."""
  from sklearn.metrics import roc_auc_score

  info = ds.split_info(ratio)
  pos_weight = info["train"]["negatives"] / max(info["train"]["positives"], 1)
  tr, va, te = (ds.padded(ratio, s) for s in bags_lib.SPLITS)
  base_test = np.asarray(mil.bag_dispersion(te.features_BxNxD, te.mask_BxN))
  base_val = np.asarray(mil.bag_dispersion(va.features_BxNxD, va.mask_BxN))
  out = {"split_info": info, "pos_weight": pos_weight,
         "baseline": {"test_auc": float(roc_auc_score(te.labels_B, base_test)),
                      "test_bootstrap": bootstrap_auc_ci(base_test, te.labels_B.astype(np.float64),
                                                         seed=int(config.seed)),
                      "val_auc": float(roc_auc_score(va.labels_B, base_val))},
         "recipes": {}}
  data = bag_data(tr, va)
  keys_S = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), s))(
      jnp.arange(int(config.num_seeds)))
  groups: dict[tuple, list[Recipe]] = {}
  for r in recipes:
    groups.setdefault((r.model, r.layer_norm), []).append(r)
  test_scores = {}
  for (kind, ln), rs in groups.items():
    rows, row_of = [], {}
    for r in rs:  # identical rows (e.g. "before" and fp_sweep_2) are trained once
      row = r.hparam_row(pos_weight)
      key = tuple(sorted(row.items()))
      if key not in row_of:
        row_of[key] = len(rows)
        rows.append(row)
      row_of[r.name] = row_of[key]
    hp_H = make_hparams(rows, max_epochs=int(config.train.max_epochs))
    res, logits_HxSxB = jax.device_get(_sweep(config, kind, ln)(
        data, hp_H, keys_S, jnp.asarray(te.features_BxNxD), jnp.asarray(te.mask_BxN)))
    if np.any(res.nonfinite):
      h, s = np.argwhere(res.nonfinite)[0]
      bad = [r.name for r in rs if row_of[r.name] == h]
      raise FloatingPointError(f"ratio {ratio}: non-finite training loss in recipe {bad} seed {s}; "
                               "training stopped there (the last finite params were kept)")
    for r in rs:
      h = row_of[r.name]
      aucs = [float(roc_auc_score(te.labels_B, logits_HxSxB[h, s])) for s in range(logits_HxSxB.shape[1])]
      test_scores[r.name] = logits_HxSxB[h]
      out["recipes"][r.name] = {
          "test_auc": aucs, "test": mean_ci(aucs),
          "val_auc": res.best_val_auc[h].tolist(), "best_epoch": res.best_epoch[h].tolist(),
          "epochs_run": res.epochs_run[h].tolist(),
          "val_auc_history_mean": _nanmean_rows(res.val_auc_E[h]),
          "hparams": rows[h], "model": r.model, "layer_norm": r.layer_norm}
  # Paired (same seeds ⇒ same init, batches and dropout) differences vs "before".
  before = np.asarray(out["recipes"]["before"]["test_auc"])
  out["paired_vs_before"] = {n: mean_ci(np.asarray(v["test_auc"]) - before)
                             for n, v in out["recipes"].items() if n != "before"}
  out["bootstrap_vs_baseline"] = {
      n: paired_bootstrap_diff(test_scores[n], base_test, te.labels_B.astype(np.float64),
                               seed=int(config.seed)) for n in test_scores}
  return out


def _nanmean_rows(x_SxE: np.ndarray) -> list:
  """Per-epoch mean over the seeds that ran that epoch; None where none did (JSON has no NaN)."""
  ok = np.isfinite(x_SxE)
  n = ok.sum(0)
  m = np.where(ok, x_SxE, 0).sum(0) / np.maximum(n, 1)
  return [float(v) if c else None for v, c in zip(m, n)]


def _fmt(ci: Mapping[str, float]) -> str:
  if not np.isfinite(ci["lo"]):
    return f"{ci['mean']:.3f}"
  return f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def _fmt_d(ci: Mapping[str, float]) -> str:
  if not np.isfinite(ci["lo"]):
    return f"{ci['mean']:+.3f}"
  return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def _ci_side(ci: Mapping[str, float]) -> int:
  """+1 if the CI lies above 0, −1 below, 0 if it covers 0 (or is undefined)."""
  if not (np.isfinite(ci["lo"]) and np.isfinite(ci["hi"])):
    return 0
  return 1 if ci["lo"] > 0 else (-1 if ci["hi"] < 0 else 0)


def relation_choice(per_ratio: Mapping[str, dict], ratio: str) -> str | None:
  """The relation-aware recipe with the highest mean *validation* AUC at this ratio (never test)."""
  rel = {n: v for n, v in per_ratio[ratio]["recipes"].items() if v["model"] == "relation"}
  if not rel:
    return None
  return max(rel, key=lambda n: (np.mean(rel[n]["val_auc"]), n))


def answers(config, per_ratio: Mapping[str, dict]) -> dict:
  """The plain-language verdicts, each from an explicit rule stated in the output."""
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  base = {r: per_ratio[r]["baseline"]["test_auc"] for r in ratios}
  before = {r: per_ratio[r]["recipes"]["before"]["test"]["mean"] for r in ratios}
  after = {r: per_ratio[r]["recipes"]["after"]["test"]["mean"] for r in ratios}
  spread = max(before.values()) - min(before.values())
  flat = spread < float(config.flat_range)
  out: dict[str, Any] = {"baseline_rule": {}, "before_spread": spread, "before_flat": flat}
  for r in ratios:
    out["baseline_rule"][r] = "signal" if base[r] >= thr else "weak"

  loss_side = {r: _ci_side(per_ratio[r]["paired_vs_before"]["loss_only"]) for r in ratios
               if "loss_only" in per_ratio[r]["paired_vs_before"]}
  n_help = sum(v > 0 for v in loss_side.values())
  loss_cause = len(loss_side) > 0 and n_help > len(loss_side) / 2
  gains = {}
  for a in ABLATIONS + ("after",):
    if all(a in per_ratio[r]["paired_vs_before"] for r in ratios):
      gains[a] = float(np.mean([per_ratio[r]["paired_vs_before"][a]["mean"] for r in ratios]))
  out.update(loss_side=loss_side, loss_weighting_cause=loss_cause, mean_gain_vs_before=gains)

  # Is the plain attention-MIL the bottleneck? Its best recipe (chosen on
  # validation AUC, never test) against the no-learning baseline.
  out["attention_vs_baseline"] = {}
  for r in ratios:
    att = {n: v for n, v in per_ratio[r]["recipes"].items() if v["model"] == "attention"}
    best = max(att, key=lambda n: (np.mean(att[n]["val_auc"]), n))
    ci, boot = att[best]["test"], per_ratio[r]["bootstrap_vs_baseline"][best]
    side = ("below" if ci["hi"] < base[r] and boot["hi"] < 0 else
            "above" if ci["lo"] > base[r] and boot["lo"] > 0 else "level")
    out["attention_vs_baseline"][r] = {"recipe": best, "test": ci, "baseline": base[r], "side": side,
                                       "bootstrap_diff": boot}

  first = min(ratios, key=bags_lib.ratio_value)
  rel = relation_choice(per_ratio, first)
  if rel is not None:
    ci = per_ratio[first]["recipes"][rel]["test"]
    boot = per_ratio[first]["bootstrap_vs_baseline"][rel]
    beat = bool(np.isfinite(ci["lo"]) and ci["lo"] > base[first] and boot["lo"] > 0)
    worse = bool(np.isfinite(ci["hi"]) and ci["hi"] < base[first] and boot["hi"] < 0)
    out["relation"] = {"ratio": first, "recipe": rel, "test": ci, "baseline": base[first],
                       "bootstrap_diff": boot, "beats_baseline": beat, "worse_than_baseline": worse}
  return out


def _answer_text(config, per_ratio, ans) -> list[str]:
  ratios = list(per_ratio)
  thr = float(config.baseline_threshold)
  L = []
  sig = [r for r in ratios if ans["baseline_rule"][r] == "signal"]
  weak = [r for r in ratios if ans["baseline_rule"][r] == "weak"]
  L.append(f"**Do the features carry the signal?** Rule (the study's): dispersion-baseline test AUC ≥ {thr:.2f} "
           "⇒ the embeddings carry the contamination signal and a flat model AUC is the model's/training's fault; "
           "below ⇒ the embeddings are weak. Here: "
           + (f"signal at {', '.join(sig)}" if sig else "signal at no ratio")
           + ("; weak at " + ", ".join(weak) if weak else "") + ".")
  b = {r: per_ratio[r]["recipes"]["before"]["test"]["mean"] for r in ratios}
  L.append(f"**Is the \"before\" AUC flat?** Rule: flat if max − min of its mean test AUC over the ratios is "
           f"< {float(config.flat_range):.2f}. Here it runs from {min(b.values()):.3f} to {max(b.values()):.3f} "
           f"(spread {ans['before_spread']:.3f}) ⇒ **{'flat' if ans['before_flat'] else 'not flat'}**.")
  side = ans["loss_side"]
  words = {1: "higher", -1: "lower", 0: "no detectable change"}
  per = "; ".join(f"{r}: {_fmt_d(per_ratio[r]['paired_vs_before']['loss_only'])} ({words[side[r]]})"
                  for r in side)
  verdict = "YES" if ans["loss_weighting_cause"] else "NO"
  L.append("**Did the loss weighting (WeightedBCE, fp_weight 2) cause the low/flat AUC?** Rule: compare \"before\" "
           "with the same recipe but plain BCE (loss only changed), paired over seeds; the weighting is a cause "
           "only if the 95 % t-CI of (BCE − WeightedBCE) lies above 0 at a majority of ratios. "
           f"Differences: {per}. ⇒ **{verdict}**.")
  av = ans["attention_vs_baseline"]
  below = [r for r in ratios if av[r]["side"] == "below"]
  per = "; ".join(f"{r}: {av[r]['recipe']} {_fmt(av[r]['test'])} vs {av[r]['baseline']:.3f} "
                  f"(bootstrap {_fmt_d(av[r]['bootstrap_diff'])})" for r in ratios)
  L.append("**Is the plain attention-MIL itself the bottleneck?** Rule: at each ratio take the attention-MIL recipe "
           "with the best mean validation AUC; it is below the no-learning baseline if its test-AUC CI over seeds "
           "lies below the baseline's AUC and the paired bootstrap CI over test bags of (model − baseline) lies "
           f"below 0 (the same rule as for the relation model). Here: {per} ⇒ below the baseline at {len(below)} of {len(ratios)} "
           "ratios" + (f" ({', '.join(below)})" if below else "") + ".")
  if ans["mean_gain_vs_before"]:
    g = ans["mean_gain_vs_before"]
    best = max((k for k in g if k != "after"), key=lambda k: g[k], default=None)
    txt = ", ".join(f"{k} {v:+.3f}" for k, v in g.items())
    L.append(f"**Which single change matters most?** Mean paired gain over \"before\" across ratios: {txt}. "
             f"The largest single-change gain is **{best}**.")
  if "relation" in ans:
    rr = ans["relation"]
    v = "YES" if rr["beats_baseline"] else ("NO (it is worse)" if rr["worse_than_baseline"] else "NO (not shown)")
    L.append(f"**Did the relation-aware model beat the dispersion baseline at {rr['ratio']}?** Rule: yes only if "
             "the 95 % t-CI over seeds of its test AUC lies above the baseline's AUC *and* the paired bootstrap "
             "CI over test bags of (model − baseline) lies above 0; the relation recipe is chosen by validation "
             f"AUC. Chosen recipe: {rr['recipe']}; test AUC {_fmt(rr['test'])} vs baseline "
             f"{rr['baseline']:.3f}; bootstrap difference {_fmt_d(rr['bootstrap_diff'])} ⇒ **{v}**.")
  return L


def _figure(config, per_ratio, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ratios = list(per_ratio)
  xs = [100 * bags_lib.ratio_value(r) for r in ratios]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 6.2))
  ax.plot(xs, [per_ratio[r]["baseline"]["test_auc"] for r in ratios], "k--o", lw=2,
          label="dispersion baseline (no learning)")
  ax.axhline(float(config.baseline_threshold), color="grey", lw=0.8, ls=":")
  styles = {"before": ("tab:red", "-", 2.2), "after": ("tab:green", "-", 2.2)}
  names = ["before", "after"] + [a for a in ABLATIONS if a in per_ratio[ratios[0]]["recipes"]]
  cmap = plt.get_cmap("tab10")
  for i, n in enumerate(names):
    color, ls, lw = styles.get(n, (cmap(4 + i), "--", 1.3))
    m = [per_ratio[r]["recipes"][n]["test"] for r in ratios]
    off = 0.35 * (i - (len(names) - 1) / 2)  # spread overlapping error bars
    ax.errorbar([x + off for x in xs], [c["mean"] for c in m], yerr=_yerr(m), color=color, ls=ls, lw=lw,
                marker="o", ms=4, capsize=3, label=n)
  rel = [relation_choice(per_ratio, r) for r in ratios]
  if all(rel):
    m = [per_ratio[r]["recipes"][n]["test"] for r, n in zip(ratios, rel)]
    ax.errorbar(xs, [c["mean"] for c in m], yerr=_yerr(m), color="tab:blue", lw=2.2, marker="s",
                capsize=3, label="relation-aware (recipe chosen on val)")
  ax.set(xlabel="contamination ratio p (%)", ylabel="test ROC AUC (mean, 95 % CI over seeds)",
         title="Test AUC vs contamination ratio", xticks=xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)

  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in per_ratio[ratios[0]]["recipes"]
                 if n.startswith("fp_sweep_"))
  for i, r in enumerate(ratios):
    m = [per_ratio[r]["recipes"][n]["test"] for _, n in sweep]
    off = 0.03 * (i - (len(ratios) - 1) / 2)
    ax2.errorbar([w + off for w, _ in sweep], [c["mean"] for c in m], yerr=_yerr(m), marker="o", ms=4,
                 capsize=3, color=cmap(i % 10), label=r)
  ax2.set(xlabel="fp_weight (negatives' loss × (1 + fp_weight))", ylabel="test ROC AUC",
          title="\"before\" recipe, fp_weight sweep", xticks=[w for w, _ in sweep])
  ax2.grid(alpha=0.3)
  ax2.legend(title="ratio", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=5, frameon=False)
  fig.tight_layout()
  with tio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)


def _yerr(cis):
  lo = [c["mean"] - c["lo"] if np.isfinite(c["lo"]) else 0.0 for c in cis]
  hi = [c["hi"] - c["mean"] if np.isfinite(c["hi"]) else 0.0 for c in cis]
  return np.array([lo, hi])


def write_report(config, per_ratio: Mapping[str, dict], ans: dict, data_info: dict, workdir: Path,
                 wall_s: float, computed: Sequence[str] = ()) -> str:
  """Renders report.md (tables + answers) and returns its text."""
  ratios = list(per_ratio)
  recs = per_ratio[ratios[0]]["recipes"]
  main = ["before", "after"] + [a for a in ABLATIONS if a in recs] + \
      [n for n in recs if recs[n]["model"] == "relation"]
  L = ["# Study B diagnosis: attention-MIL on contaminated identity bags", ""]
  L.append(f"Seeds per cell: {int(config.num_seeds)}; cells show mean test ROC AUC and its 95 % t-interval over "
           "seeds (`scipy.stats.t`). All recipes share each seed's initialisation, batch order and dropout "
           f"masks, so differences are paired. Wall time of this invocation: {wall_s:.0f} s, computing "
           f"{len(computed)} of {len(ratios)} ratios (the rest reused from `ratios/`); time per ratio when computed: "
           + ", ".join(f"{r} {per_ratio[r].get('elapsed_s', float('nan')):.0f} s" for r in ratios) + ".")
  L.append("")
  L.append("## Answers")
  L.append("")
  L += [f"- {t}" for t in _answer_text(config, per_ratio, ans)]
  L.append("")
  L.append("## Test AUC per ratio")
  L.append("")
  L.append("| recipe | " + " | ".join(ratios) + " |")
  L.append("|---|" + "---|" * len(ratios))
  L.append("| dispersion baseline (bootstrap CI over test bags) | "
           + " | ".join(_fmt(per_ratio[r]["baseline"]["test_bootstrap"]) for r in ratios) + " |")
  for n in main:
    L.append(f"| {n} | " + " | ".join(_fmt(per_ratio[r]["recipes"][n]["test"]) for r in ratios) + " |")
  L.append("")
  L.append("## Paired difference vs \"before\" (same seeds), mean [95 % CI]")
  L.append("")
  L.append("| recipe | " + " | ".join(ratios) + " |")
  L.append("|---|" + "---|" * len(ratios))
  for n in main[1:]:
    L.append(f"| {n} − before | " + " | ".join(_fmt_d(per_ratio[r]["paired_vs_before"][n]) for r in ratios) + " |")
  L.append("")
  sweep = sorted((float(n[len("fp_sweep_"):]), n) for n in recs if n.startswith("fp_sweep_"))
  if sweep:
    L.append("## fp_weight sweep (\"before\" recipe, only fp_weight changed; 0 = plain BCE)")
    L.append("")
    L.append("| fp_weight | " + " | ".join(ratios) + " |")
    L.append("|---|" + "---|" * len(ratios))
    for w, n in sweep:
      L.append(f"| {w:g} | " + " | ".join(_fmt(per_ratio[r]["recipes"][n]["test"]) for r in ratios) + " |")
    L.append("")
  L.append("![AUC vs contamination ratio](auc_vs_ratio.png)")
  L.append("")
  L.append("Reading the intervals: model CIs are t-intervals over seeds on one fixed test set (they are not "
           "clipped to [0, 1] and leave out test-set sampling); the baseline's CI is a bootstrap over test bags, "
           "and the relation-vs-baseline verdict also requires a paired bootstrap over test bags. Verdict rules "
           "were fixed before the run; nothing was tuned on test AUC.")
  L.append("")
  L.append("## Recipes")
  L.append("")
  L.append("| recipe | model | LayerNorm | loss | fp_weight | lr | epochs | patience | mean epochs run (first ratio) |")
  L.append("|---|---|---|---|---|---|---|---|---|")
  for n, v in recs.items():
    h = v["hparams"]
    loss = "WeightedBCE" if h["fp_weight"] > 0 else f"BCE (pos_weight {h['pos_weight']:.2f})"
    L.append(f"| {n} | {v['model']} | {v['layer_norm']} | {loss} | {h['fp_weight']:g} | {h['learning_rate']:g} | "
             f"{h['epochs']} | {h['patience']} | {np.mean(v['epochs_run']):.1f} |")
  L.append("")
  L.append("## Data")
  L.append("")
  L.append(f"Source: {data_info.get('source', '?')}. Bag size {data_info.get('bag_size')}, positive fraction "
           f"{data_info.get('positive_fraction')}, instance pools (split before bagging) "
           f"{data_info.get('pool_sizes')}.")
  q = data_info.get("heldout_quality")
  if q:
    L.append(f"Bag identities {q['identities']}: mean cosine within identity {q['intra_cos']:.3f}, between "
             f"{q['inter_cos']:.3f}; leave-one-out nearest-centroid identity accuracy {q['ncc_accuracy']:.3f}.")
  L.append("")
  L.append("| ratio | " + " | ".join(f"{s} count/positives" for s in bags_lib.SPLITS) + " | val AUC baseline |")
  L.append("|---|" + "---|" * (len(bags_lib.SPLITS) + 1))
  for r in ratios:
    si = per_ratio[r]["split_info"]
    L.append(f"| {r} | " + " | ".join(f"{si[s]['count']}/{si[s]['positives']}" for s in bags_lib.SPLITS)
             + f" | {per_ratio[r]['baseline']['val_auc']:.3f} |")
  L.append("")
  text = "\n".join(L) + "\n"
  tio.atomic_write_text(workdir / "report.md", text)
  return text


def run_diagnosis(config, workdir: str | Path, *, progress: bool = True) -> dict:
  """The full study-B diagnosis; writes config.json, ratios/<r>.json, results.json, report.md, the figure.

  Finished ratios are stored as ``ratios/<ratio>.json`` with the config's
  hash; a rerun in the same workdir with the same config reuses them, so a
  killed run resumes where it stopped.
  """
  from tqdm import tqdm

  t0 = time.time()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not config.data.get("cache_dir"):
    config = config.copy_and_resolve_references()
    config.data.cache_dir = str(workdir / "cache")
  if int(config.num_seeds) < 2:
    raise ValueError(f"config.num_seeds must be >= 2 for confidence intervals; got {config.num_seeds}")
  tio.atomic_write_text(workdir / "config.json", config.to_json(indent=2, sort_keys=True) + "\n")
  recipes = recipes_from_config(config)
  ds = bags_lib.dataset_from_config(config.data)
  chash = _config_hash(config)
  per_ratio, computed = {}, []
  for r in tqdm(ds.ratios, desc="ratios", disable=not progress):
    path = workdir / "ratios" / f"{r}.json"
    if path.exists():
      cached = json.loads(path.read_text())
      if cached.get("config_hash") == chash:
        per_ratio[r] = cached["result"]
        continue
    t_r = time.time()
    per_ratio[r] = diagnose_ratio(config, ds, r, recipes)
    per_ratio[r]["elapsed_s"] = time.time() - t_r
    computed.append(r)
    tio.atomic_write_json(path, {"config_hash": chash, "result": per_ratio[r]})
  ans = answers(config, per_ratio)
  wall = time.time() - t0
  data_info = {k: v for k, v in ds.info.items() if k != "settings"}
  results = {"config_hash": chash, "wall_s": wall, "computed_ratios": computed, "answers": ans, "per_ratio": per_ratio, "data": data_info,
             "answer_text": _answer_text(config, per_ratio, ans)}
  _figure(config, per_ratio, workdir / "auc_vs_ratio.png")
  write_report(config, per_ratio, ans, data_info, workdir, wall, computed)
  tio.atomic_write_json(workdir / "results.json", results)
  return results
