"""Training flows on in-memory feature maps: one run, or many runs stacked into one program.

A *row* is one training run, identified by its hyperparameters (λ = tail_weight,
r = top_k_ratio, learning_rate) and its ``row_key``. Everything random in a row
comes from its key:

    params  = model.init(fold_in(row_key, 0), x)
    batch_t = feats[randint(fold_in(fold_in(row_key, 1), t), B)]   (step t)
    step key = fold_in(row_key, 2)  (folded with the step inside train_step)

so rows that share a key (say λ = 0 and λ = 0.7 with seed s) start from the
same weights and see the same batches — a paired comparison — and row i of a
stacked run equals the single run with row i's hyperparameters and key.
Batches are a deterministic function of the step, so resumed runs replay exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import flows, losses, train

HPARAM_NAMES = ("tail_weight", "top_k_ratio", "learning_rate")


def make_flow_loss(model: flows.FastFlow2d):
  """``loss_fn(params, batch, hparams, key)`` for ``train.make_train_step``:
  the tail-aware loss with λ = hparams["tail_weight"], r = hparams["top_k_ratio"]."""

  def loss_fn(params, feats_BxHxWxC, hparams, key):
    del key  # the flow is deterministic
    nll_BxN = flows.flat_nll(model, params, feats_BxHxWxC)
    loss = losses.tail_aware_loss(nll_BxN, hparams["tail_weight"], hparams["top_k_ratio"])
    return loss, {"mean_nll": jnp.mean(nll_BxN)}

  return loss_fn


def init_row(model, tx, example_1xHxWxC, hparams: Mapping, row_key) -> train.TrainState:
  """A fresh TrainState for one row (traceable in ``hparams`` and ``row_key``)."""
  params = model.init(jax.random.fold_in(row_key, 0), example_1xHxWxC)
  state = train.create_state(model.apply, params, tx, {
      "tail_weight": hparams["tail_weight"], "top_k_ratio": hparams["top_k_ratio"]})
  return train.set_learning_rate(state, hparams["learning_rate"])


def sample_batch(feats_NxHxWxC, batch_size: int, row_key, step):
  """The row's mini-batch at ``step`` (uniform with replacement)."""
  k = jax.random.fold_in(jax.random.fold_in(row_key, 1), step)
  return feats_NxHxWxC[jax.random.randint(k, (batch_size,), 0, feats_NxHxWxC.shape[0])]


def row_keys(seeds: Sequence[int]) -> jax.Array:
  """One key per row: ``fold_in(key(0), seed)``; a single run with ``cfg.seed = s``
  is the row with seed s."""
  base = jax.random.key(0)
  return jnp.stack([jax.random.fold_in(base, int(s)) for s in seeds])


def hparams_from_config(cfg, **overrides) -> dict:
  h = {"tail_weight": float(cfg.loss.tail_weight), "top_k_ratio": float(cfg.loss.top_k_ratio),
       "learning_rate": float(cfg.optim.learning_rate)}
  h.update({k: float(v) for k, v in overrides.items()})
  losses.validate_tail_params(h["tail_weight"], h["top_k_ratio"], where="config.loss")
  return h


def _check_feats(feats, where: str) -> None:
  if feats.ndim != 4:
    raise ValueError(f"{where}: features must be [N, H, W, C], got shape {feats.shape}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{where}: features contain NaN/Inf")


def model_for(cfg, channels: int) -> flows.FastFlow2d:
  flow_cfg = dict(cfg.flow)
  flow_cfg["channels"] = int(channels)
  return flows.build_flow(flow_cfg)


def train_flow_on_features(cfg, workdir: str | Path, train_feats: np.ndarray,
                           val_feats: np.ndarray | None = None, progress: bool = True) -> tuple:
  """One checkpointed run of ``flows.build_flow(cfg.flow)`` on ``train_feats``.

  Config fields: seed, flow.*, optim.*, loss.tail_weight, loss.top_k_ratio,
  train.{num_steps, batch_size, log_every, eval_every, patience}. With
  ``val_feats`` the mean validation NLL is monitored: best checkpoint, optional
  patience, and the best state is returned. Returns (model, FitResult).
  """
  hp = hparams_from_config(cfg)
  _check_feats(train_feats, "train_flow_on_features")
  model = model_for(cfg, train_feats.shape[-1])
  tx = train.make_optimizer(cfg.optim)
  key = row_keys([cfg.seed])[0]
  step_key = jax.random.fold_in(key, 2)
  feats = jnp.asarray(train_feats)
  bs = int(cfg.train.batch_size)
  step = jax.jit(train.make_train_step(make_flow_loss(model)), donate_argnums=0)
  get_batch = jax.jit(lambda t: sample_batch(feats, bs, key, t))
  eval_fn = None
  if val_feats is not None:
    val = jnp.asarray(val_feats)
    val_nll = jax.jit(lambda p: jnp.mean(model.apply(p, val, method="nll")))
    eval_fn = lambda st: {"val_nll": float(val_nll(st.params))}
  result = train.fit(
      workdir=workdir, init_fn=lambda _: init_row(model, tx, feats[:1], hp, key),
      train_step=step, get_batch=lambda t: get_batch(jnp.asarray(t, jnp.int32)),
      key=step_key, num_steps=cfg.train.num_steps, config=cfg, log_every=cfg.train.log_every,
      eval_fn=eval_fn,
      eval_every=cfg.train.get("eval_every", cfg.train.log_every) if eval_fn else None,
      monitor="val_nll" if eval_fn else None, monitor_mode="min",
      patience=cfg.train.get("patience", None), progress=progress, desc="flow")
  return model, result


def resolve_row_mode(mode: str) -> str:
  """"vmap" stacks rows into one program; "loop" runs them one after another with one
  compiled step. "auto" picks "loop" on CPU, where XLA lowers a vmapped convolution
  with per-row weights to a grouped convolution that runs slower per row than the
  plain one (measured in benchmarks/), and "vmap" on GPU/TPU."""
  if mode == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  if mode not in ("vmap", "loop"):
    raise ValueError(f"train.rows must be 'auto', 'vmap' or 'loop', got {mode!r}")
  return mode


def train_flow_rows(cfg, workdir: str | Path, train_feats: np.ndarray, hparams_R: Mapping,
                    seeds_R: Sequence[int], progress: bool = True, desc: str = "flows",
                    mode: str = "vmap") -> tuple:
  """R runs (rows) of the flow, each checkpointed and resumable.

  Args:
    hparams_R: ``{"tail_weight": [R], "top_k_ratio": [R], "learning_rate": [R]}``.
    seeds_R: per-row seed; row i equals ``train_flow_on_features`` with seed seeds_R[i].
    mode: "vmap" trains all rows as one vmapped program (one checkpoint of the
      stacked state in ``workdir``); "loop" trains them one by one with a single
      compiled step (checkpoints in ``workdir/row_<i>``); "auto", see
      ``resolve_row_mode``.
  Returns:
    (model, state) where every leaf of ``state`` has a leading row axis.
  """
  _check_feats(train_feats, "train_flow_rows")
  h_R = {k: np.asarray(hparams_R[k], np.float32) for k in HPARAM_NAMES}
  r = len(seeds_R)
  for k, v in h_R.items():
    if v.shape != (r,):
      raise ValueError(f"hparams[{k!r}] must have shape ({r},) like seeds, got {v.shape}")
  losses.validate_tail_params(h_R["tail_weight"], h_R["top_k_ratio"], where="sweep")
  if np.any(h_R["learning_rate"] <= 0):
    raise ValueError(f"sweep learning_rate must be > 0, got {h_R['learning_rate'].tolist()}")
  mode = resolve_row_mode(mode)
  model = model_for(cfg, train_feats.shape[-1])
  tx = train.make_optimizer(cfg.optim)
  keys_R = row_keys(seeds_R)
  feats = jnp.asarray(train_feats)
  bs = int(cfg.train.batch_size)
  single_step = train.make_train_step(make_flow_loss(model))
  common = dict(num_steps=cfg.train.num_steps, config=cfg, log_every=cfg.train.log_every,
                progress=progress)

  if mode == "vmap":
    h_R = {k: jnp.asarray(v) for k, v in h_R.items()}
    step_keys_R = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys_R)
    init_fn = lambda _: jax.vmap(lambda h, k: init_row(model, tx, feats[:1], h, k))(h_R, keys_R)
    step = jax.jit(jax.vmap(single_step), donate_argnums=0)
    batches = jax.jit(lambda t: jax.vmap(lambda k: sample_batch(feats, bs, k, t))(keys_R))
    result = train.fit(workdir=workdir, init_fn=init_fn, train_step=step,
                       get_batch=lambda t: batches(jnp.asarray(t, jnp.int32)), key=step_keys_R,
                       desc=desc, **common)
    return model, result.state

  step = jax.jit(single_step, donate_argnums=0)
  batch = jax.jit(sample_batch, static_argnums=1)
  init = jax.jit(lambda h, k: init_row(model, tx, feats[:1], h, k))
  states = []
  for i in range(r):
    h = {k: jnp.asarray(v[i]) for k, v in h_R.items()}
    key = keys_R[i]
    result = train.fit(workdir=Path(workdir) / f"row_{i}", init_fn=lambda _: init(h, key),
                       train_step=step, key=jax.random.fold_in(key, 2),
                       get_batch=lambda t: batch(feats, bs, key, jnp.asarray(t, jnp.int32)),
                       desc=f"{desc} {i + 1}/{r}", **common)
    states.append(result.state)
  return model, jax.tree.map(lambda *xs: jnp.stack(xs), *states)
