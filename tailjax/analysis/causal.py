"""Statistics for study A's causal chain and the honest versions of H1 / H4.

The original study's story is a chain; each link gets a measurement and a rule:

* **L1 concentration.** The tail share of image b's update,
  ``share_b = ⟨G_T,b, G_b⟩ / ⟨G_b, G_b⟩`` with ``G_b = ∂(Σ_i w_bi NLL_bi)/∂θ``
  and ``G_T,b`` the same sum over the tail patches. If every patch's gradient
  had the same size and direction, the share would be the tail's share of the
  loss weights, ``λ + (1 − λ)·k/N`` — concentration *by construction*. The
  empirical part is the excess ``share_b − null`` (t-interval over images).
* **L2 boundary learning.** On held-out *normal* images: the upper tail of
  patch NLL (98th / 99.5th percentile) and its distance from the median. A
  model that "learns the boundary of the normal distribution" shrinks that tail.
* **L3 scoring at boundaries.** Pixel AP and FPR at a fixed TPR with the
  positives restricted to a band of ``band_px`` pixels inside each defect's
  border, vs the defect interior (all normal pixels are the negatives in both).
* **L4 the outcome**: pixel AP / image AUROC, from the study's own tables.

Exact vs even-share per-patch NLL (``topk_jaccard``): the overlap of the two
definitions' top-k sets per image, the manipulation check of that comparison.

H1 at the image level: one statistic per image (its tail patches' mean minus its
non-tail patches' mean), then a Wilcoxon signed-rank test across images, so the
196 correlated patches of an image count once. H4 purity against a hard set
defined by an *independent* model (``hypotheses.topk_dilution(hard_nll_BxN=...)``).

The generic tests these build on (paired t-tests, Holm correction, per-category
verdicts) are in ``tailjax.stats``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import scipy.stats

from tailjax import flows, losses, metrics
from tailjax.stats import mean_ci, paired_test


# ----------------------------------------------------------------------------
# L1: the tail share of the update against its construction null
# ----------------------------------------------------------------------------


def construction_null(tail_weight: float, k: int, n: int) -> float:
  """The tail's share of the loss weights: λ + (1 − λ)·k/N."""
  return float(tail_weight) + (1.0 - float(tail_weight)) * k / n


def per_image_update_share(model: flows.FastFlow2d, params, feats_BxHxWxC, weights_BxN,
                           tail_BxN, chunk: int = 8) -> np.ndarray:
  """``share_b = ⟨G_T,b, G_b⟩ / ⟨G_b, G_b⟩`` for every image b (see module doc)."""

  def grad_one(x_HxWxC, w_N):
    return jax.grad(lambda p: jnp.sum(w_N * flows.flat_nll(model, p, x_HxWxC[None])[0]))(params)

  def share_one(x_HxWxC, w_N, t_N):
    g = grad_one(x_HxWxC, w_N)
    gt = grad_one(x_HxWxC, w_N * t_N)
    dot = lambda a, b: sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    gg = dot(g, g)
    return jnp.where(gg > 0, dot(gt, g) / gg, jnp.nan)

  fn = jax.jit(jax.vmap(share_one))
  x = np.asarray(feats_BxHxWxC, np.float32)
  w = np.asarray(weights_BxN, np.float32)
  t = np.asarray(tail_BxN, np.float32)
  out = [np.asarray(fn(x[i:i + chunk], w[i:i + chunk], t[i:i + chunk]))
         for i in range(0, len(x), chunk)]
  return np.concatenate(out)


def l1_excess(share_B: Sequence[float], null: float) -> dict:
  """Measured share vs the construction null: mean share, excess with its t-interval
  over images and one-sample t-test p; ``beyond`` is True when the excess's CI lies
  above 0 (concentration beyond what the weights alone give)."""
  s = np.asarray(share_B, np.float64)
  s = s[np.isfinite(s)]
  ex = paired_test(s - null)
  return {"share": float(s.mean()) if s.size else float("nan"), "null": float(null),
          "excess": ex, "n_images": int(s.size),
          "beyond": bool(np.isfinite(ex["lo"]) and ex["lo"] > 0),
          "below": bool(np.isfinite(ex["hi"]) and ex["hi"] < 0)}


# ----------------------------------------------------------------------------
# L2: the normal tail; L3: boundary bands
# ----------------------------------------------------------------------------


def normal_tail(nll_patches, quantiles=(50.0, 98.0, 99.5)) -> dict:
  """Percentiles of the patch NLLs of held-out normal images and the tail's distance
  from the median (``gap = p99.5 − p50``: scale-free in location)."""
  v = np.asarray(nll_patches, np.float64).reshape(-1)
  q = {f"p{str(x).rstrip('0').rstrip('.')}": float(np.percentile(v, x)) for x in quantiles}
  q["mean"] = float(v.mean())
  q["gap"] = q["p99.5"] - q["p50"]
  return q


def boundary_bands(masks_NxHxW, band_px: int) -> tuple[np.ndarray, np.ndarray]:
  """(band, interior) of every defect: ``band`` = defect pixels within ``band_px`` of the
  defect's border (mask minus its erosion), ``interior`` = the rest of the defect."""
  m = np.asarray(masks_NxHxW, bool)
  struct = np.zeros((1, 3, 3), bool)
  struct[0] = True                                  # 8-connected, within each image only
  eroded = scipy.ndimage.binary_erosion(m, structure=struct, iterations=int(band_px),
                                        border_value=1)
  return m & ~eroded, eroded


def fpr_at_tpr(scores_P, positive_P, tpr: float) -> float:
  """The FPR at the highest threshold whose TPR reaches ``tpr`` (ties kept together);
  ``metrics.ap_and_fpr_against_negatives`` on this one positive set."""
  s = np.asarray(scores_P, np.float64)
  y = np.asarray(positive_P, bool)
  return metrics.ap_and_fpr_against_negatives(np.sort(s[~y]), s[y], tpr)[1]


def boundary_metrics(maps_NxHxW, masks_NxHxW, band_px: int, tpr: float) -> dict:
  """Pixel AP and FPR@TPR with positives = the defect border band, or = the defect
  interior; negatives = every normal pixel of the test set in both. Also the same
  over all defect pixels (the usual pixel AP) for reference."""
  maps = np.asarray(maps_NxHxW, np.float32)
  masks = np.asarray(masks_NxHxW, bool)
  band, interior = boundary_bands(masks, band_px)
  neg_sorted = np.sort(maps[~masks])        # the shared negatives, sorted once
  out = {"band_px": int(band_px), "tpr": float(tpr)}
  for name, pos in (("band", band), ("interior", interior), ("all", masks)):
    if pos.sum() == 0:
      out[name] = {"ap": float("nan"), "fpr_at_tpr": float("nan"), "n_pos": 0}
      continue
    ap, fpr = metrics.ap_and_fpr_against_negatives(neg_sorted, maps[pos], tpr)
    out[name] = {"ap": ap, "fpr_at_tpr": fpr, "n_pos": int(pos.sum())}
  return out


# ----------------------------------------------------------------------------
# H1 at the image level
# ----------------------------------------------------------------------------


def image_level_contrast(values_BxN, tail_BxN) -> dict:
  """Per image: mean of ``values`` over its tail patches minus over its non-tail
  patches; then the Wilcoxon signed-rank test and the sign test across images (each
  image counts once, however many correlated patches it has)."""
  v = np.asarray(values_BxN, np.float64)
  t = np.asarray(tail_BxN, bool)
  d = np.array([v[b][t[b]].mean() - v[b][~t[b]].mean() for b in range(len(v))])
  nz = d[d != 0]
  wil = (float(scipy.stats.wilcoxon(nz).pvalue) if nz.size >= 2 else float("nan"))
  sign = (float(scipy.stats.binomtest(int((nz > 0).sum()), int(nz.size)).pvalue)
          if nz.size >= 1 else float("nan"))
  ratio = np.array([v[b][t[b]].mean() / v[b][~t[b]].mean() for b in range(len(v))
                    if v[b][~t[b]].mean() != 0])
  return {"diff": mean_ci(d), "n_images": int(d.size), "n_positive": int((d > 0).sum()),
          "wilcoxon_p": wil, "sign_p": sign,
          "median_ratio": float(np.median(ratio)) if ratio.size else float("nan")}


def border_distance_contrast(tail_BxN, grid_hw: tuple[int, int]) -> dict:
  """Per image: mean distance of its tail patches to the nearest grid border minus the
  mean over all patches (the expectation under uniform placement); Wilcoxon across
  images (negative = tail patches nearer the border)."""
  h, w = grid_hw
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  dist_N = np.minimum.reduce([ii, jj, h - 1 - ii, w - 1 - jj]).reshape(-1).astype(np.float64)
  t = np.asarray(tail_BxN, bool)
  d = np.array([dist_N[t[b]].mean() - dist_N.mean() for b in range(len(t))])
  nz = d[d != 0]
  wil = float(scipy.stats.wilcoxon(nz).pvalue) if nz.size >= 2 else float("nan")
  return {"diff": mean_ci(d), "n_images": int(d.size), "wilcoxon_p": wil,
          "uniform_mean": float(dist_N.mean())}


# ----------------------------------------------------------------------------
# Exact vs even-share per-patch NLL: do the two rankings pick different patches?
# ----------------------------------------------------------------------------


def topk_jaccard(score_a_BxN, score_b_BxN, top_k_ratio) -> np.ndarray:
  """Per image b, the Jaccard overlap |A_b ∩ B_b| / |A_b ∪ B_b| of the top-k patch sets
  ranked by ``score_a`` and by ``score_b`` (descending), k = max(1, round(r · N))
  (``losses.top_k_count``), ties broken by index exactly as the loss breaks them
  (``losses.top_k_indicator``): [B] in [0, 1], 1 when both pick the same k patches.

  The manipulation check of exact vs even-share: scores that pick nearly the same
  patches (overlap near 1) give losses a comparison of their results cannot tell apart.
  """
  if np.shape(score_a_BxN) != np.shape(score_b_BxN) or np.ndim(score_a_BxN) != 2:
    raise ValueError(f"topk_jaccard: need two [B, N] score arrays of one shape, got "
                     f"{np.shape(score_a_BxN)} and {np.shape(score_b_BxN)}")
  a = np.asarray(losses.top_k_indicator(jnp.asarray(score_a_BxN), top_k_ratio)) > 0
  b = np.asarray(losses.top_k_indicator(jnp.asarray(score_b_BxN), top_k_ratio)) > 0
  inter = (a & b).sum(axis=1)
  return inter / (a | b).sum(axis=1)


def overlap_summary(jaccard_B) -> dict:
  """Mean (t-interval), median and 10th percentile of per-image overlaps."""
  j = np.asarray(jaccard_B, np.float64).ravel()
  if j.size == 0:
    return {"n_images": 0}
  return {"n_images": int(j.size), "mean": mean_ci(j), "median": float(np.median(j)),
          "p10": float(np.percentile(j, 10)), "min": float(j.min())}
