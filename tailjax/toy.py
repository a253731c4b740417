"""A toy density lifted into feature maps, and a flow trainer on in-memory features.

``two_moons_maps`` draws every patch's feature vector from a two-moons density
embedded in C dimensions by a fixed random rotation (plus small isotropic
noise): a non-Gaussian, curved density that an affine-coupling flow must learn.
It is the smallest honest check that the training core really fits densities.

``train_flow_on_features`` is the generic single-run flow trainer on in-memory
feature maps (mini-batches drawn from ``fold_in(data_key, step)``, so a resumed
run sees exactly the same batches); study A's script builds on it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets

from tailjax import flows, losses, train


def two_moons_maps(n: int, h: int, w: int, c: int, seed: int, noise: float = 0.05) -> np.ndarray:
  """[n, h, w, c] float32 feature maps; each patch is an independent two-moons sample."""
  if c < 2:
    raise ValueError(f"toy.channels must be ≥ 2, got {c}")
  xy, _ = datasets.make_moons(n * h * w, noise=noise, random_state=seed)
  xy = (xy - np.array([0.5, 0.25])) / np.array([0.9, 0.5])  # roughly zero mean, unit scale
  rng = np.random.default_rng(10_000 + seed)
  rot, _ = np.linalg.qr(np.random.default_rng(12345).normal(size=(c, c)))  # same embedding for every seed
  feats = np.concatenate([xy, 0.1 * rng.normal(size=(n * h * w, c - 2))], axis=1) @ rot.T
  return feats.reshape(n, h, w, c).astype(np.float32)


def make_flow_loss(model: flows.FastFlow2d):
  """``loss_fn(params, batch, hparams, key)`` for ``train.make_train_step``:
  the tail-aware loss with λ = hparams["tail_weight"], r = hparams["top_k_ratio"]."""

  def loss_fn(params, feats_BxHxWxC, hparams, key):
    del key  # the flow is deterministic
    nll_BxN = flows.flat_nll(model, params, feats_BxHxWxC)
    loss = losses.tail_aware_loss(nll_BxN, hparams["tail_weight"], hparams["top_k_ratio"])
    return loss, {"mean_nll": jnp.mean(nll_BxN)}

  return loss_fn


def make_batch_fn(feats_NxHxWxC: np.ndarray, batch_size: int, data_key: jax.Array):
  """``get_batch(step)``: a deterministic mini-batch (with replacement) for every step."""
  feats = jnp.asarray(feats_NxHxWxC)
  n = feats.shape[0]

  @jax.jit
  def _batch(step):
    idx = jax.random.randint(jax.random.fold_in(data_key, step), (batch_size,), 0, n)
    return feats[idx]

  return lambda step: _batch(jnp.asarray(step, jnp.int32))


def train_flow_on_features(cfg, workdir: str | Path, train_feats: np.ndarray,
                           val_feats: np.ndarray | None = None, progress: bool = True) -> tuple:
  """Trains ``flows.build_flow(cfg.flow)`` on ``train_feats`` with checkpoints in ``workdir``.

  Config fields: seed, flow.*, optim.*, loss.tail_weight, loss.top_k_ratio,
  train.{num_steps, batch_size, log_every, eval_every, patience}.
  Returns (model, FitResult).
  """
  losses.validate_tail_params(cfg.loss.tail_weight, cfg.loss.top_k_ratio, where="config.loss")
  if not np.all(np.isfinite(train_feats)):
    raise ValueError("training features contain NaN/Inf")
  flow_cfg = dict(cfg.flow)
  flow_cfg["channels"] = int(train_feats.shape[-1])
  model = flows.build_flow(flow_cfg)
  tx = train.make_optimizer(cfg.optim)
  key = jax.random.key(cfg.seed)
  init_key, data_key, step_key = jax.random.split(key, 3)
  example = jnp.asarray(train_feats[:1])

  def init_fn(k):
    del k  # keys are split from cfg.seed above so init and data are independent
    params = model.init(init_key, example)
    return train.create_state(model.apply, params, tx, hparams={
        "tail_weight": cfg.loss.tail_weight, "top_k_ratio": cfg.loss.top_k_ratio})

  step = jax.jit(train.make_train_step(make_flow_loss(model)), donate_argnums=0)
  eval_fn = None
  if val_feats is not None:
    val = jnp.asarray(val_feats)
    val_nll = jax.jit(lambda p: jnp.mean(model.apply(p, val, method="nll")))
    eval_fn = lambda st: {"val_nll": float(val_nll(st.params))}
  result = train.fit(
      workdir=workdir, init_fn=init_fn, train_step=step,
      get_batch=make_batch_fn(train_feats, cfg.train.batch_size, data_key),
      key=step_key, num_steps=cfg.train.num_steps, config=cfg,
      log_every=cfg.train.log_every, eval_fn=eval_fn,
      eval_every=cfg.train.get("eval_every", cfg.train.log_every) if eval_fn else None,
      monitor="val_nll" if eval_fn else None, monitor_mode="min",
      patience=cfg.train.get("patience", None), progress=progress, desc="flow")
  return model, result


def run_toy(cfg, workdir: str | Path, progress: bool = True) -> dict:
  """Trains on two-moons maps, compares held-out NLL before/after, writes ``result.json``."""
  d = cfg.data
  tr = two_moons_maps(d.n_train, d.grid, d.grid, d.channels, seed=cfg.seed)
  va = two_moons_maps(d.n_val, d.grid, d.grid, d.channels, seed=cfg.seed + 1)
  model, result = train_flow_on_features(cfg, workdir, tr, va, progress=progress)
  init_params = model.init(jax.random.key(0), jnp.asarray(tr[:1]))
  nll = jax.jit(lambda p: jnp.mean(model.apply(p, jnp.asarray(va), method="nll")))
  out = {"untrained_val_nll": float(nll(init_params)), "trained_val_nll": float(nll(result.state.params)),
         "best_step": result.best_step, "steps": int(result.state.step)}
  from tailjax import io
  io.atomic_write_json(Path(workdir) / "result.json", out)
  print(f"held-out NLL/patch: untrained {out['untrained_val_nll']:.3f} -> "
        f"trained {out['trained_val_nll']:.3f} (best step {out['best_step']}, {workdir})")
  return out
