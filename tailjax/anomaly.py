"""Anomaly maps from per-patch scores, and the PaDiM baseline.

Every method in study A ends the same way: a per-patch score on the feature
grid (flow NLL, FastFlow's ``-exp(-0.5 mean z^2)``, or a Mahalanobis
distance), bilinearly upsampled to the image size, optionally smoothed with a
Gaussian (σ = 4 px is common), and reduced to an image score (max, or the mean
of the top-k pixels). The helpers here are that shared tail of the pipeline.

PaDiM (Defard et al., 2021) is the no-training baseline: one Gaussian per grid
position fitted to the defect-free training features,

  μ_p = mean_n x_np,   Σ_p = 1/(N-1) Σ_n (x_np - μ_p)(x_np - μ_p)^T + ε I,

and the score of a test patch is its Mahalanobis distance
``sqrt((x - μ_p)^T Σ_p^{-1} (x - μ_p))``, evaluated as ``||L_p^{-1}(x - μ_p)||``
with the Cholesky factor ``Σ_p = L_p L_p^T`` (a triangular solve; Σ is never
inverted).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from tailjax.losses import patch_nll


# ----------------------------------------------------------------------------
# Per-patch scores of a flow
# ----------------------------------------------------------------------------


def fastflow_score(z_NxHxWxC: jax.Array) -> jax.Array:
  """FastFlow's per-patch anomaly score ``-exp(-0.5 * mean_c z_c^2)``, ``[N, H, W]``.

  It lies in [-1, 0): -1 where z = 0 (typical) and -> 0 for atypical patches;
  bounded, so one extreme patch cannot dominate a multi-scale average.
  """
  return -jnp.exp(-0.5 * jnp.mean(jnp.square(z_NxHxWxC), axis=-1))


def nll_score(z_NxHxWxC: jax.Array, logdet_NxHxW: jax.Array, *,
              per_dim: bool = False) -> jax.Array:
  """Per-patch NLL ``0.5 ||z||^2 - logdet + (C/2) log 2π`` (nats), ``[N, H, W]``.

  ``per_dim`` divides by C (nats per dimension) so scales with different
  channel counts can be averaged.
  """
  nll_NxHxW = patch_nll(z_NxHxWxC, logdet_NxHxW)
  return nll_NxHxW / z_NxHxWxC.shape[-1] if per_dim else nll_NxHxW


# ----------------------------------------------------------------------------
# Map helpers
# ----------------------------------------------------------------------------


def _hw(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def upsample_maps(scores_NxhxW: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``[N, h, w]`` maps to ``[N, H, W]`` (``size`` = H or (H, W)).

  Half-pixel-centre convention (``align_corners=False``), like
  ``torch.nn.functional.interpolate``: a constant map stays constant and the
  value of patch (i, j) sits at the centre of its cell. Jittable.
  """
  maps = jnp.asarray(scores_NxhxW, jnp.float32)
  if maps.ndim != 3:
    raise ValueError(f"upsample_maps expects [N, h, w] maps, got shape {maps.shape}")
  h, w = _hw(size)
  return jax.image.resize(maps, (maps.shape[0], h, w), method="bilinear")


def smooth_maps(maps_NxHxW, sigma: float) -> np.ndarray:
  """Gaussian smoothing of each map (σ in pixels; reflect borders, truncate 4σ).

  The same as ``scipy.ndimage.gaussian_filter(map, sigma)`` on every map; no
  mixing across maps. σ = 0 returns the maps unchanged.
  """
  maps = np.asarray(maps_NxHxW, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"smooth_maps expects [N, H, W] maps, got shape {maps.shape}")
  if sigma < 0:
    raise ValueError(f"sigma must be >= 0, got {sigma}")
  if sigma == 0:
    return maps
  return ndi.gaussian_filter(maps, sigma=(0.0, sigma, sigma), mode="reflect")


def image_scores(maps_NxHxW, mode: str = "max", k: int | None = None) -> jax.Array:
  """Image-level scores ``[N]`` from anomaly maps.

  ``mode="max"``: the largest pixel score. ``mode="topk_mean"``: the mean of
  the ``k`` largest pixel scores (k >= 1, at most H*W), which is less
  sensitive to a single hot pixel.
  """
  maps = jnp.asarray(maps_NxHxW)
  if maps.ndim != 3:
    raise ValueError(f"image_scores expects [N, H, W] maps, got shape {maps.shape}")
  flat_NxP = maps.reshape(maps.shape[0], -1)
  if mode == "max":
    return flat_NxP.max(axis=-1)
  if mode == "topk_mean":
    if k is None or not 1 <= int(k) <= flat_NxP.shape[1]:
      raise ValueError(f"topk_mean needs 1 <= k <= {flat_NxP.shape[1]}, got k={k}")
    return jax.lax.top_k(flat_NxP, int(k))[0].mean(axis=-1)
  raise ValueError(f"mode must be 'max' or 'topk_mean', got {mode!r}")


def anomaly_maps(scores_Nxhxw, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
  """Per-patch scores -> pixel maps: bilinear upsampling to ``size``, then smoothing."""
  return smooth_maps(np.asarray(upsample_maps(scores_Nxhxw, size)), sigma)


def combine_scales(maps_by_scale: Sequence[jax.Array], size: int | tuple[int, int]) -> jax.Array:
  """Mean of per-scale maps after upsampling each to ``size`` (FastFlow's multi-scale map)."""
  if not maps_by_scale:
    raise ValueError("combine_scales needs at least one map")
  return jnp.mean(jnp.stack([upsample_maps(m, size) for m in maps_by_scale]), axis=0)


def fastflow_anomaly_map(z_by_scale: Sequence[jax.Array],
                         size: int | tuple[int, int]) -> jax.Array:
  """FastFlow/anomalib map: per scale ``-exp(-0.5 mean_c z^2)``, upsampled, averaged."""
  return combine_scales([fastflow_score(z) for z in z_by_scale], size)


# ----------------------------------------------------------------------------
# PaDiM
# ----------------------------------------------------------------------------


class GaussianFit(NamedTuple):
  """Per-position Gaussians of a PaDiM fit (a pytree).

  Attributes:
    mean_HxWxC: μ_p.
    chol_HxWxCxC: lower Cholesky factor L_p of Σ_p + εI.
    channels_C: int32 indices of the feature channels used (a random subset or all).
  """
  mean_HxWxC: jax.Array
  chol_HxWxCxC: jax.Array
  channels_C: jax.Array


def padim_fit(features_NxHxWxC, eps: float = 0.01, n_channels: int | None = None,
              seed: int = 0) -> GaussianFit:
  """Fits PaDiM's Gaussian at every grid position to defect-free features.

  Args:
    features_NxHxWxC: training features (N >= 2 images).
    eps: ridge ε added to every covariance (PaDiM: 0.01), making Σ_p positive
      definite even when N <= C.
    n_channels: keep a random subset of this many channels (PaDiM's random
      dimensionality reduction), drawn with ``numpy.random.default_rng(seed)``;
      None keeps all.
    seed: seed of the channel subset.
  Returns:
    a ``GaussianFit``.
  """
  x = jnp.asarray(features_NxHxWxC, jnp.float32)
  if x.ndim != 4:
    raise ValueError(f"padim_fit expects features [N, H, W, C], got shape {x.shape}")
  n, _, _, c = x.shape
  if n < 2:
    raise ValueError(f"padim_fit needs at least 2 training images, got {n}")
  if eps <= 0:
    raise ValueError(f"eps must be > 0 so every covariance is positive definite, got {eps}")
  if n_channels is None or n_channels >= c:
    channels = np.arange(c)
  else:
    if n_channels < 1:
      raise ValueError(f"n_channels must be >= 1, got {n_channels}")
    channels = np.sort(np.random.default_rng(seed).choice(c, n_channels, replace=False))
  channels = jnp.asarray(channels, jnp.int32)
  mean, chol = _fit(x, channels, jnp.float32(eps))
  if not bool(jnp.isfinite(chol).all()):
    raise FloatingPointError("PaDiM covariance is not positive definite (non-finite Cholesky "
                             "factor); check the features for NaN/Inf or raise eps")
  return GaussianFit(mean, chol, channels)


@jax.jit
def _fit(x_NxHxWxC, channels_D, eps):
  x = jnp.take(x_NxHxWxC, channels_D, axis=-1)
  n, d = x.shape[0], x.shape[-1]
  mean_HxWxD = x.mean(axis=0)
  centred = x - mean_HxWxD[None]  # two-pass: no catastrophic cancellation in E[xx^T]-μμ^T
  cov_HxWxDxD = jnp.einsum("nhwc,nhwd->hwcd", centred, centred) / (n - 1)
  cov_HxWxDxD = cov_HxWxDxD + eps * jnp.eye(d, dtype=x.dtype)[None, None]
  return mean_HxWxD, jnp.linalg.cholesky(cov_HxWxDxD)


def padim_score(fit: GaussianFit, features_NxHxWxC, *, squared: bool = False,
                chunk_size: int = 64) -> jax.Array:
  """Mahalanobis distance of every test patch to its position's Gaussian, ``[N, H, W]``.

  ``d_np = ||L_p^{-1} (x_np - μ_p)||`` (``squared=True``: ``d^2``), computed
  ``chunk_size`` images at a time to bound memory.
  """
  x = jnp.asarray(features_NxHxWxC, jnp.float32)
  if x.ndim != 4 or x.shape[1:3] != fit.mean_HxWxC.shape[:2]:
    raise ValueError(f"padim_score expects features [N, H, W, C] on the fitted "
                     f"{fit.mean_HxWxC.shape[:2]} grid, got shape {x.shape}")
  out = [_mahalanobis_sq(fit, x[i:i + chunk_size]) for i in range(0, x.shape[0], chunk_size)]
  d2_NxHxW = jnp.concatenate(out) if out else jnp.zeros(x.shape[:3], jnp.float32)
  return d2_NxHxW if squared else jnp.sqrt(d2_NxHxW)


@jax.jit
def _mahalanobis_sq(fit: GaussianFit, x_NxHxWxC):
  x = jnp.take(x_NxHxWxC, fit.channels_C, axis=-1)
  diff_HxWxDxN = jnp.transpose(x - fit.mean_HxWxC[None], (1, 2, 3, 0))
  y_HxWxDxN = jax.scipy.linalg.solve_triangular(fit.chol_HxWxCxC, diff_HxWxDxN, lower=True)
  return jnp.transpose(jnp.sum(jnp.square(y_HxWxDxN), axis=2), (2, 0, 1))
