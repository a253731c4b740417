"""PaDiM against direct NumPy maths, and the anomaly-map helpers against references."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.transform

from tailjax import anomaly
from tailjax.losses import patch_nll


def _train_features(seed=0, n=40, h=3, w=4, c=6):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(h, w, c, c))  # correlated channels, different per position
  z = rng.normal(size=(n, h, w, c))
  offset = rng.normal(size=(h, w, c)) * 3
  return (np.einsum("hwcd,nhwd->nhwc", mix, z) + offset).astype(np.float32)


def _direct_mahalanobis_sq(train, test, eps, channels=None):
  """(x-μ)^T Σ^{-1} (x-μ) with an explicit inverse, float64, one position at a time."""
  if channels is not None:
    train, test = train[..., channels], test[..., channels]
  train, test = train.astype(np.float64), test.astype(np.float64)
  n, h, w, c = test.shape
  out = np.zeros((n, h, w))
  for i in range(h):
    for j in range(w):
      mu = train[:, i, j].mean(0)
      cov = np.cov(train[:, i, j], rowvar=False, ddof=1) + eps * np.eye(c)
      inv = np.linalg.inv(cov)
      d = test[:, i, j] - mu
      out[:, i, j] = np.einsum("nc,cd,nd->n", d, inv, d)
  return out


def test_padim_equals_direct_mahalanobis():
  train = _train_features()
  test = _train_features(seed=1, n=5) * 1.3
  fit = anomaly.padim_fit(train, eps=0.01)
  d2 = np.asarray(anomaly.padim_score(fit, test, squared=True, chunk_size=2))
  ref = _direct_mahalanobis_sq(train, test, 0.01)
  np.testing.assert_allclose(d2, ref, rtol=2e-4)
  d = np.asarray(anomaly.padim_score(fit, test))
  np.testing.assert_allclose(d, np.sqrt(ref), rtol=2e-4)


def test_padim_channel_subset_is_direct_on_the_subset():
  train = _train_features(c=8)
  test = _train_features(seed=2, n=3, c=8)
  fit = anomaly.padim_fit(train, eps=0.05, n_channels=5, seed=7)
  channels = np.asarray(fit.channels_C)
  assert len(channels) == 5 and len(set(channels.tolist())) == 5
  np.testing.assert_array_equal(
      channels, anomaly.padim_fit(train, eps=0.05, n_channels=5, seed=7).channels_C)
  d2 = np.asarray(anomaly.padim_score(fit, test, squared=True))
  np.testing.assert_allclose(d2, _direct_mahalanobis_sq(train, test, 0.05, channels), rtol=2e-4)


def test_padim_outlier_patch_scores_highest():
  both = _train_features(n=62)  # one distribution: 60 train images, 2 test images
  train, test = both[:60], both[60:].copy()
  # Shift one patch along its position's least-variance direction: small in
  # Euclidean terms, large in Mahalanobis terms.
  cov = np.cov(train[:, 1, 2], rowvar=False)
  evals, evecs = np.linalg.eigh(cov)
  test[1, 1, 2] = train[:, 1, 2].mean(0) + 10 * np.sqrt(evals[0]) * evecs[:, 0]
  test[1, 0, 0] = train[:, 0, 0].mean(0)  # the most typical patch possible
  euclidean = np.linalg.norm(test[1] - train.mean(0), axis=-1)
  assert euclidean[1, 2] < np.median(euclidean)  # invisible to a Euclidean score
  scores = np.asarray(anomaly.padim_score(anomaly.padim_fit(train), test))
  assert np.unravel_index(scores[1].argmax(), scores[1].shape) == (1, 2)
  assert scores[1].argmin() == 0
  assert np.all(scores >= 0)


def test_padim_needs_two_images_and_positive_eps():
  with pytest.raises(ValueError, match="at least 2"):
    anomaly.padim_fit(np.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match="eps"):
    anomaly.padim_fit(np.zeros((4, 2, 2, 3)), eps=0.0)


# ----------------------------------------------------------------------------
# Maps
# ----------------------------------------------------------------------------


def test_upsampling_preserves_constants_and_matches_bilinear_reference():
  const = np.full((2, 4, 5), 3.25, np.float32)
  np.testing.assert_allclose(np.asarray(anomaly.upsample_maps(const, (32, 40))), 3.25)
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 4, 5)).astype(np.float32)
  up = np.asarray(anomaly.upsample_maps(maps, 16))
  assert up.shape == (3, 16, 16)
  ref = np.stack([skimage.transform.resize(m, (16, 16), order=1, mode="edge",
                                           anti_aliasing=False) for m in maps])
  np.testing.assert_allclose(up, ref, atol=1e-5)
  # Bilinear weights are a convex combination: no new extremes.
  assert up.max() <= maps.max() + 1e-6 and up.min() >= maps.min() - 1e-6


def test_smoothing_matches_scipy_per_map():
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(3, 20, 24)).astype(np.float32)
  maps[0, 10, 12] = 50.0
  out = anomaly.smooth_maps(maps, 4.0)
  for m, o in zip(maps, out):
    np.testing.assert_allclose(o, ndi.gaussian_filter(m, 4.0), rtol=1e-5, atol=1e-5)
  spike = np.zeros((2, 15, 15), np.float32)
  spike[0, 7, 7] = 1.0
  smoothed = anomaly.smooth_maps(spike, 2.0)
  assert not smoothed[1].any()  # maps do not bleed into each other
  assert smoothed[0].sum() == pytest.approx(1.0, rel=1e-4)
  np.testing.assert_array_equal(anomaly.smooth_maps(maps, 0.0), maps)


def test_image_scores_max_and_topk():
  rng = np.random.default_rng(2)
  maps = rng.normal(size=(4, 6, 7)).astype(np.float32)
  flat = maps.reshape(4, -1)
  np.testing.assert_allclose(np.asarray(anomaly.image_scores(maps)), flat.max(1))
  top5 = np.sort(flat, 1)[:, -5:].mean(1)
  np.testing.assert_allclose(np.asarray(anomaly.image_scores(maps, "topk_mean", k=5)), top5,
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(anomaly.image_scores(maps, "topk_mean", k=1)),
                             flat.max(1))
  np.testing.assert_allclose(np.asarray(anomaly.image_scores(maps, "topk_mean", k=42)),
                             flat.mean(1), rtol=1e-5)
  with pytest.raises(ValueError, match="k"):
    anomaly.image_scores(maps, "topk_mean", k=43)


def test_fastflow_and_nll_scores():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  s = np.asarray(anomaly.fastflow_score(z))
  np.testing.assert_allclose(s, -np.exp(-0.5 * np.mean(z ** 2, -1)), rtol=1e-6)
  assert np.all(s >= -1) and np.all(s < 0)
  assert np.asarray(anomaly.fastflow_score(2 * z) > anomaly.fastflow_score(z)).all()
  logdet = rng.normal(size=(2, 3, 4)).astype(np.float32)
  nll = np.asarray(anomaly.nll_score(z, logdet))
  ref = 0.5 * (z ** 2).sum(-1) - logdet + 3 * math.log(2 * math.pi)
  np.testing.assert_allclose(nll, ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(anomaly.nll_score(z, logdet, per_dim=True)), ref / 6,
                             rtol=1e-5)
  np.testing.assert_allclose(nll, np.asarray(patch_nll(jnp.asarray(z), jnp.asarray(logdet))))


def test_multiscale_fastflow_map_is_mean_of_upsampled_scales():
  rng = np.random.default_rng(4)
  z8 = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  z16 = rng.normal(size=(2, 2, 2, 5)).astype(np.float32)
  m = np.asarray(anomaly.fastflow_anomaly_map([z8, z16], 8))
  ref = 0.5 * (np.asarray(anomaly.upsample_maps(anomaly.fastflow_score(z8), 8))
               + np.asarray(anomaly.upsample_maps(anomaly.fastflow_score(z16), 8)))
  np.testing.assert_allclose(m, ref, rtol=1e-6)
  full = anomaly.anomaly_maps(anomaly.fastflow_score(z8), 16, sigma=1.0)
  assert isinstance(full, np.ndarray) and full.shape == (2, 16, 16)
