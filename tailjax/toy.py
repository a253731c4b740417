"""A toy density lifted into feature maps.

``two_moons_maps`` draws every patch's feature vector from a two-moons density
embedded in C dimensions by a fixed random rotation (plus small isotropic
noise): a non-Gaussian, curved density that an affine-coupling flow must learn.
It is the smallest honest check that the training core really fits densities.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets

from tailjax import flow_train, io


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


def run_toy(cfg, workdir: str | Path, progress: bool = True) -> dict:
  """Trains on two-moons maps, compares held-out NLL before/after, writes ``result.json``."""
  d = cfg.data
  tr = two_moons_maps(d.n_train, d.grid, d.grid, d.channels, seed=cfg.seed)
  va = two_moons_maps(d.n_val, d.grid, d.grid, d.channels, seed=cfg.seed + 1)
  model, result = flow_train.train_flow_on_features(cfg, workdir, tr, va, progress=progress)
  init_params = model.init(jax.random.key(0), jnp.asarray(tr[:1]))
  nll = jax.jit(lambda p: jnp.mean(model.apply(p, jnp.asarray(va), method="nll")))
  out = {"untrained_val_nll": float(nll(init_params)), "trained_val_nll": float(nll(result.state.params)),
         "best_step": result.best_step, "steps": int(result.state.step)}
  io.atomic_write_json(Path(workdir) / "result.json", out)
  print(f"held-out NLL/patch: untrained {out['untrained_val_nll']:.3f} -> "
        f"trained {out['trained_val_nll']:.3f} (best step {out['best_step']}, {workdir})")
  return out
