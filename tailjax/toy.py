"""A toy density lifted into feature maps.

``two_moons_maps`` draws every patch's feature vector from a two-moons density
embedded in C dimensions by a fixed random rotation (plus small isotropic
noise): a non-Gaussian, curved density that an affine-coupling flow must learn.
It is the smallest honest check that the training engine really fits densities:
``run_toy`` trains one row on the engine and evaluates the held-out NLL through
its evaluation hook (step 0 = the untrained, identity flow).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from sklearn import datasets

from tailjax import engine, evaluation, io, runrecord

KIND = "toy"
FIELDS = ("seed", "data.n_train", "data.n_val", "data.grid", "data.channels", "flow.*",
          "loss.tail_weight", "loss.top_k_ratio", "optim.*", "train.num_steps",
          "train.batch_size", "train.eval_every", "train.segment_steps", "train.row_mode",
          "train.conv_impl", "train.batch_devices", "train.profile_steps", "train.precision")


def two_moons_maps(n: int, h: int, w: int, c: int, seed: int, noise: float = 0.05) -> np.ndarray:
  """[n, h, w, c] float32 feature maps; each patch is an independent two-moons sample."""
  if c < 2:
    raise ValueError(f"config.data.channels must be ≥ 2, got {c}")
  xy, _ = datasets.make_moons(n * h * w, noise=noise, random_state=seed)
  xy = (xy - np.array([0.5, 0.25])) / np.array([0.9, 0.5])  # roughly zero mean, unit scale
  rng = np.random.default_rng(10_000 + seed)
  rot, _ = np.linalg.qr(np.random.default_rng(12345).normal(size=(c, c)))  # same embedding for every seed
  feats = np.concatenate([xy, 0.1 * rng.normal(size=(n * h * w, c - 2))], axis=1) @ rot.T
  return feats.reshape(n, h, w, c).astype(np.float32)


def run_toy(cfg, workdir: str | Path, *, on_change: str = "error", progress: bool = True) -> dict:
  """Trains on two-moons maps, compares held-out NLL before/after, writes ``result.json``."""
  runrecord.check_fields(cfg, FIELDS)
  d = cfg.data
  tr = two_moons_maps(d.n_train, d.grid, d.grid, d.channels, seed=cfg.seed)
  va = two_moons_maps(d.n_val, d.grid, d.grid, d.channels, seed=cfg.seed + 1)
  rows = engine.Rows.from_dicts([{"tail_weight": cfg.loss.tail_weight,
                                  "top_k_ratio": cfg.loss.top_k_ratio,
                                  "learning_rate": cfg.optim.learning_rate, "seed": cfg.seed}],
                                where="config.loss")
  every = int(cfg.train.eval_every)
  if every < 1:
    raise ValueError(f"config.train.eval_every must be ≥ 1, got {every}")
  total = int(cfg.train.num_steps)
  steps = sorted({0, *range(every, total, every), total})

  def evaluate(step, params_R, program):
    p = jax.tree.map(lambda a: a[0], params_R)
    nll = evaluation.patch_scores(program.model, p, va, "nll", conv_impl=program.conv_impl)
    return {"val_nll": float(np.mean(nll))}

  with runrecord.open_run(workdir, cfg, kind=KIND, on_change=on_change, extendable=True) as run:
    res = engine.run_rows(cfg, run, "toy", tr, rows, eval_steps=steps, evaluate=evaluate,
                          progress=progress, desc="toy")
    curve = {s: res.evals[s]["val_nll"] for s in steps}
    best = min(curve, key=curve.get)
    out = {"untrained_val_nll": curve[0], "trained_val_nll": curve[total], "best_step": best,
           "best_val_nll": curve[best], "steps": res.step, "val_nll_by_step": curve}
    io.atomic_write_json(run.path("result.json"), out)
  print(f"held-out NLL/patch: untrained {out['untrained_val_nll']:.3f} -> "
        f"trained {out['trained_val_nll']:.3f} (best step {best}, {workdir})")
  return out
