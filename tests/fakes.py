"""Test helper: a cheap, deterministic stand-in for a backbone (whose compilation would
dominate the tests that need one), for ``monkeypatch.setattr(pipeline, "make_extractor", ...)``."""

import numpy as np


def cellstats_extractor(grid_hw: tuple[int, int], channels: int, cache_id: str):
  """``make_extractor``-shaped factory: per cell of a ``grid_hw`` grid over the image, the
  channel means and stds, randomly projected to ``channels`` channels (a deterministic
  function of the pixels), returned as the stride-16 map."""
  proj = np.random.default_rng(0).normal(size=(6, channels)) / 2
  gh, gw = grid_hw

  def make(cfg):
    del cfg

    def extract(images_BxHxWx3):
      x = np.asarray(images_BxHxWx3, np.float32)
      h, w = x.shape[1:3]
      x = x.reshape(-1, gh, h // gh, gw, w // gw, 3) / 255.0
      stats = np.concatenate([x.mean((2, 4)), x.std((2, 4))], axis=-1)   # [B, gh, gw, 6]
      return {16: np.tanh(stats @ proj)}
    return extract, cache_id

  return make
