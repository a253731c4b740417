"""Study B: training attention-MIL as one pure, vmappable function.

``make_train_fn(model, ...)`` returns ``train_fn(data, hparams, key)``;
``make_train(config, data)`` closes over the data and returns the vmappable
``train(hparams, key)``, so

    sweep = jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))
    out_HxS = sweep(hparams_H, keys_S)

trains every hyperparameter row × seed as ONE compiled program. The swept
values are arrays (``HParams``): learning rate, ``fp_weight``,
``pos_weight`` and the integer ``epochs`` and ``patience``.

Training uses the shared pieces of ``tailjax.train``: a ``TrainState``
(loss weights in ``state.hparams``), the optimiser factory
``train.make_optimizer`` (Adam behind ``optax.inject_hyperparams``; each row's
learning rate is set with ``train.set_learning_rate``), the pure step of
``train.make_train_step`` (dropout key ``fold_in(key, state.step)``) and the
in-graph ``train.EarlyStopping`` on the validation AUC (mode "max").

Epochs run in a ``lax.while_loop`` bounded by the static ``max_epochs``; a
row's loop body is a no-op once its own epoch budget is spent or it has
stopped (under ``vmap`` the loop runs until every row is done, and finished
rows keep their state). Each epoch shuffles the training bags with
``fold_in(key, epoch)``; after each epoch the validation AUC (rank-sum
formula, ``rank_auc``) decides whether to keep a copy of the parameters
(strict improvement) and counts bad epochs; ``patience`` bad epochs in a row
stop the run. The returned parameters are the best epoch's.

The study's diagnosis (recipes, verdicts, report) lives in the study layer
above the core (``studies/mil_diagnosis.py``); nothing here imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from tailjax import losses
from tailjax import mil
from tailjax import train as train_lib
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


def make_hparams(hparam_rows: Sequence[Mapping[str, float]], *, max_epochs: int | None = None) -> HParams:
  """Stacks dict rows (keys = ``HParams`` fields) into an [H] grid, validating each row.

  Errors name the row and field: lr ≤ 0, negative weights, epochs outside
  [1, max_epochs], patience < 1, or fp_weight > 0 together with pos_weight ≠ 1.
  """
  fields = HParams._fields
  cols = {f: [] for f in fields}
  for i, row in enumerate(hparam_rows):
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
  state: train_lib.TrainState
  best_params: Any
  es: train_lib.EarlyStopping
  nonfinite: jax.Array
  val_auc_E: jax.Array
  train_loss_E: jax.Array


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


OPTIMIZER = {"name": "adam"}  # the study's optimiser; each row's learning rate is set in-graph


def make_train_fn(model: mil.AttentionMIL, *, batch_size: int, max_epochs: int,
                  optimizer: Mapping[str, Any] | None = None
                  ) -> Callable[[BagData, HParams, jax.Array], TrainOutput]:
  """Returns the pure ``train_fn(data, hparams, key) -> TrainOutput`` (see module doc).

  Static: the model structure, ``batch_size``, ``max_epochs`` and the
  optimiser block for ``train.make_optimizer`` (default Adam; its learning
  rate is replaced by ``hparams.learning_rate``). The last
  ``n_train mod batch_size`` bags of each shuffled epoch are dropped, so
  every step has the same shape. Keys: ``key`` → (init, shuffle, dropout);
  epoch e shuffles with ``fold_in(shuffle, e)``, step t (``state.step``, the
  global step) drops out with ``fold_in(dropout, t)``. Rows with the same key
  share the initialisation, the batch order and the dropout masks, so recipe
  comparisons are paired.
  """
  if max_epochs < 1 or batch_size < 1:
    raise ValueError(f"train.max_epochs and train.batch_size must be >= 1; got {max_epochs}, {batch_size}")
  tx = train_lib.make_optimizer(dict(optimizer or OPTIMIZER))

  def loss_fn(params, batch, hparams, key):
    x_BxNxD, mask_BxN, y_B = batch
    logits_B, _ = model.apply(params, x_BxNxD, mask_BxN, deterministic=False, rngs={"dropout": key})
    return bag_loss(logits_B, y_B, hparams["fp_weight"], hparams["pos_weight"]), {}

  train_step = train_lib.make_train_step(loss_fn)

  def train_fn(data: BagData, hp: HParams, key: jax.Array) -> TrainOutput:
    n_train = data.train_x.shape[0]
    bs = min(batch_size, n_train)
    steps = n_train // bs
    k_init, k_shuffle, k_dropout = jax.random.split(key, 3)
    params = model.init(k_init, data.train_x[:1], data.train_mask[:1])
    state = train_lib.create_state(model.apply, params, tx,
                                   {"fp_weight": hp.fp_weight, "pos_weight": hp.pos_weight})
    state = train_lib.set_learning_rate(state.replace(step=jnp.int32(0)), hp.learning_rate)

    def sgd_step(st, idx_B):
      st, metrics = train_step(st, (data.train_x[idx_B], data.train_mask[idx_B], data.train_y[idx_B]),
                               k_dropout)
      return st, metrics["loss"]

    def val_auc(p):
      logits_B, _ = model.apply(p, data.val_x, data.val_mask, deterministic=True)
      return rank_auc(logits_B, data.val_y)

    def active(c: _Carry):
      return (c.epoch < max_epochs) & (c.epoch < hp.epochs) & ~c.es.stop & ~c.nonfinite

    def epoch_body(c: _Carry) -> _Carry:
      e = c.epoch
      perm = jax.random.permutation(jax.random.fold_in(k_shuffle, e), n_train)
      idx_SxB = perm[: steps * bs].reshape(steps, bs)
      st, loss_S = jax.lax.scan(sgd_step, c.state, idx_SxB)
      loss = jnp.mean(loss_S)
      finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(loss_S))
      auc = val_auc(st.params)
      # A non-finite epoch never improves (NaN), and it stops the run.
      es, improved = train_lib.early_stopping_update(
          c.es, jnp.where(finite, auc, jnp.nan), e, patience=hp.patience, mode="max")
      return _Carry(
          epoch=e + 1,
          state=_select(finite, st, c.state),  # a non-finite epoch is discarded
          best_params=_select(improved, st.params, c.best_params),
          es=es,
          nonfinite=c.nonfinite | ~finite,
          val_auc_E=c.val_auc_E.at[e].set(auc),
          train_loss_E=c.train_loss_E.at[e].set(loss))

    nan_E = jnp.full((max_epochs,), jnp.nan, jnp.float32)
    init = _Carry(jnp.int32(0), state, params, train_lib.early_stopping_init(), jnp.bool_(False),
                  nan_E, nan_E)
    c = jax.lax.while_loop(active, epoch_body, init)
    # EarlyStopping keeps the best in "min" orientation: best AUC = −best.
    return TrainOutput(c.best_params, c.es.best_step, -c.es.best, c.epoch, c.nonfinite,
                       c.val_auc_E, c.train_loss_E)

  return train_fn


def model_from_config(model_cfg: Mapping[str, Any], *, kind: str, layer_norm: bool,
                      pooling: str = "attention") -> mil.AttentionMIL:
  """The MIL model of a ``config.model`` block (input_dim, hidden_dim,
  attention_dim, dropout, gated) with the recipe's structure choices."""
  return mil.make_model(kind, input_dim=int(model_cfg["input_dim"]), hidden_dim=int(model_cfg["hidden_dim"]),
                        attention_dim=int(model_cfg["attention_dim"]), dropout=float(model_cfg["dropout"]),
                        gated=bool(model_cfg["gated"]), layer_norm=bool(layer_norm), pooling=pooling)


def make_train(config, data: BagData, *, kind: str = "attention", layer_norm: bool = False,
               pooling: str = "attention"):
  """``train(hparams, key) -> TrainOutput`` for one model structure, closing over ``data``.

  ``config`` needs ``model`` (input_dim, hidden_dim, attention_dim, dropout,
  gated) and ``train`` (batch_size, max_epochs). Vmap it over hyperparameters
  and seeds: ``jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))``.
  """
  fn = make_train_fn(model_from_config(config.model, kind=kind, layer_norm=layer_norm, pooling=pooling),
                     batch_size=int(config.train.batch_size), max_epochs=int(config.train.max_epochs))
  return lambda hparams, key: fn(data, hparams, key)
