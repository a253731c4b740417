"""Evaluation of trained flows: the one chunked scorer, latents, and maps → metrics.

``chunked(fn, params, x_NxHxWxC, chunk)`` is the only place where per-patch
outputs of many images are computed: images go through in chunks of ``chunk``,
the last chunk padded (by repeating its last image) so every call has one
compiled shape, and the padding is dropped. ``patch_scores`` (anomaly scores),
``latents`` (z for calibration) and ``patch_nll`` are built on it and used by
study A, the sweeps, the mechanism analyses and the toy run.

**Multi-scale FastFlow** (``flows.MultiScaleFlow``): features are a tuple of
per-scale arrays ``[N, H_s, W_s, C_s]``; ``chunked`` cuts every scale at the same
images, and the scorers return a tuple of per-scale outputs. ``evaluate_scores``
given such a tuple builds the map as anomalib's FastFlow does — each scale's
patch scores upsampled bilinearly to ``eval.size``, then averaged over scales —
and then applies the configured Gaussian smoothing (anomalib's FastFlow map has
no smoothing; since both the average and the Gaussian filter are linear,
smoothing before or after averaging gives the same map up to float rounding).

**Evaluation records of a grid** (``evaluate_rows``): every row's test metrics,
held-out validation NLL statistics and defect-border metrics, its metrics on bootstrap
resamples of the test images and per defect kind (``resampled_metrics``), and on the
rungs of a difficulty ladder; the one evaluator of study A's rows and of the sweeps'
(the engine's ``evaluate`` hook).
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import hashlib
import os
from typing import Mapping

import jax
import numpy as np

from tailjax import anomaly, flows, losses, metrics, stats
from tailjax import train as train_lib
from tailjax.analysis import causal

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC",
                "pixel_ap": "pixel AP", "aupro": "AUPRO@0.3"}
SCORES = ("nll", "fastflow")
OUTPUTS = (*SCORES, "z")


@functools.lru_cache(maxsize=32)
def _compiled(model: flows.FastFlow2d, output: str, conv_impl: str):
  """One jitted function per (model, output, lowering); params are an argument, so
  every row, seed and category with the same flow shares the compilation."""

  @jax.jit
  def run(params, x_BxHxWxC):
    with train_lib.lowering(conv_impl):
      out = model.apply(params, x_BxHxWxC)
    if isinstance(model, flows.MultiScaleFlow):
      return tuple(_output(z, logdet) for z, logdet in out)
    return _output(*out)

  def _output(z, logdet):
    if output == "nll":
      return losses.patch_nll(z, logdet)
    if output == "fastflow":
      return anomaly.fastflow_score(z)
    return z

  return run


def chunked(fn, params, x_NxHxWxC, chunk: int = 32) -> np.ndarray:
  """``fn(params, x_chunk)`` over all N images in chunks of ``chunk`` (the last padded to
  the same shape), concatenated on the host. ``x`` may be a tuple of per-scale arrays of
  the same N images (every scale cut at the same images); ``fn`` may return a tuple."""
  if isinstance(x_NxHxWxC, (tuple, list)):
    x = tuple(np.asarray(a) for a in x_NxHxWxC)
    n = len(x[0])
    if any(len(a) != n for a in x):
      raise ValueError(f"chunked: scales hold different numbers of images {[len(a) for a in x]}")
  else:
    x = np.asarray(x_NxHxWxC)
    n = len(x)
  if n == 0:
    raise ValueError("chunked: no images")
  size = min(chunk, n)

  def pad(a, real):
    return a if real == size else np.concatenate([a, np.repeat(a[-1:], size - real, axis=0)])

  out = []
  for i in range(0, n, size):
    real = min(size, n - i)
    xb = tuple(pad(a[i:i + size], real) for a in x) if isinstance(x, tuple) else \
        pad(x[i:i + size], real)
    out.append(jax.tree.map(lambda o: np.asarray(o)[:real], fn(params, xb)))
  if isinstance(out[0], tuple):
    return tuple(np.concatenate([o[s] for o in out]) for s in range(len(out[0])))
  return np.concatenate(out)


def _resolve(conv_impl: str | None) -> str:
  return train_lib.resolve_conv_impl(conv_impl or "xla")


def patch_scores(model: flows.FastFlow2d, params, feats_NxhxwxC, score: str = "nll",
                 chunk: int = 32, conv_impl: str | None = None) -> np.ndarray:
  """Per-patch anomaly scores [N, h, w]: "nll" (nats) or "fastflow" (−exp(−0.5·mean z²));
  for a multi-scale flow a tuple of [N, h_s, w_s], one per scale."""
  if score not in SCORES:
    raise ValueError(f"config.eval.score must be one of {SCORES}, got {score!r}")
  return chunked(_compiled(model, score, _resolve(conv_impl)), params, feats_NxhxwxC, chunk)


def latents(model: flows.FastFlow2d, params, feats_NxhxwxC, chunk: int = 32,
            conv_impl: str | None = None) -> np.ndarray:
  """z of every patch [N, h, w, C] (the model normalises its input as in training); a
  tuple of per-scale z for a multi-scale flow."""
  return chunked(_compiled(model, "z", _resolve(conv_impl)), params, feats_NxhxwxC, chunk)


def evaluate_scores(eval_cfg: Mapping, scores_Nxhxw: np.ndarray, test_masks_NxSxS: np.ndarray,
                    test_labels_N: np.ndarray) -> tuple[dict, np.ndarray]:
  """(metrics, pixel maps [N, S, S]) for per-patch scores: bilinear upsampling to
  ``eval.size``, Gaussian smoothing ``eval.smoothing_sigma``, image score
  ``eval.image_score`` (max or top-k mean with ``eval.image_topk``), then
  image/pixel AUROC, pixel AP and AUPRO up to ``eval.fpr_limit``.

  ``scores`` may be a tuple of per-scale scores [N, h_s, w_s] (multi-scale FastFlow):
  the map is then ``multiscale_maps`` (upsample each, average, smooth)."""
  m, maps, _ = _evaluate(eval_cfg, scores_Nxhxw, test_masks_NxSxS, test_labels_N)
  return m, maps


def _evaluate(e: Mapping, scores_Nxhxw, test_masks_NxSxS, test_labels_N):
  """(metrics, maps, (float32 maps, image scores)) of ``evaluate_scores``."""
  maps, img = maps_and_image_scores(e, scores_Nxhxw)
  maps32 = maps.astype(np.float32)
  m = metrics.evaluate(maps32, test_masks_NxSxS, img, test_labels_N, fpr_limit=e["fpr_limit"])
  return m, maps, (maps32, img)


def maps_and_image_scores(eval_cfg: Mapping, scores_Nxhxw) -> tuple[np.ndarray, np.ndarray]:
  """(pixel maps [N, S, S], image scores [N]) of per-patch scores, as ``evaluate_scores``
  builds them (upsampling, smoothing, ``eval.image_score``)."""
  e = eval_cfg
  if isinstance(scores_Nxhxw, (tuple, list)):
    maps = multiscale_maps(scores_Nxhxw, e["size"], e["smoothing_sigma"])
  else:
    maps = anomaly.anomaly_maps(scores_Nxhxw, e["size"], sigma=e["smoothing_sigma"])
  return maps, np.asarray(anomaly.image_scores(maps, e["image_score"], k=e["image_topk"]))


def test_weights(labels_N, n_boot: int, seed: int) -> np.ndarray:
  """Bootstrap multiplicities ``[n_boot, N]`` of a test set's images, stratified by label
  (the test set's class balance is fixed by its design; ``stats.bootstrap_weights``).
  Every row of a category is resampled with the same weights, so differences between
  rows (tail − mean of one seed) are paired; a category's rungs share their image order
  and labels, so they share the weights too."""
  return stats.bootstrap_weights(np.asarray(labels_N).reshape(-1), n_boot, seed)


def resampled_metrics(maps_NxSxS, masks_NxSxS, image_scores_N, labels_N, types_N,
                      weights_RxN) -> dict:
  """Pixel AP and image AUROC on every resample of the test images and per defect kind:

  * ``boot``: ``{"pixel_ap": [R], "image_auroc": [R]}`` with image n counted
    ``weights_RxN[r, n]`` times (``metrics.pixel_ap_resamples``: one sort of every
    pixel serves every resample; ``stats.weighted_auc`` on the image-score pair counts);
  * ``by_kind``: per defect kind k (``types_N`` other than "good"), the two metrics on the
    images of kind k together with every good image, and ``n`` = its defective images;
  * ``observed``: both metrics on the test set as it is.

  The kinds and the observed set are rows of 0/1 weights in the same sweep.
  """
  types = np.asarray(types_N)
  n = len(types)
  kinds = sorted({str(t) for t in types if t != "good"})
  good = types == "good"
  rows = [np.ones(n)] + [((types == k) | good).astype(np.float64) for k in kinds]
  w_RxN = np.concatenate([np.stack(rows), np.asarray(weights_RxN, np.float64).reshape(-1, n)])
  ap_R = metrics.pixel_ap_resamples(maps_NxSxS, masks_NxSxS, w_RxN)
  auc_R = stats.weighted_auc(stats.auc_pair_counts(image_scores_N, labels_N), w_RxN)
  k = 1 + len(kinds)
  return {"observed": {"pixel_ap": float(ap_R[0]), "image_auroc": float(auc_R[0])},
          "by_kind": {kind: {"pixel_ap": float(ap_R[1 + i]), "image_auroc": float(auc_R[1 + i]),
                             "n": int(np.sum(types == kind))} for i, kind in enumerate(kinds)},
          "boot": {"pixel_ap": ap_R[k:].tolist(), "image_auroc": auc_R[k:].tolist()}}


def multiscale_maps(scores_by_scale, size, sigma: float) -> np.ndarray:
  """Pixel maps [N, S, S] of multi-scale scores: every scale's [N, h_s, w_s] scores
  upsampled bilinearly to ``size`` and averaged over scales (FastFlow/anomalib,
  ``anomaly.combine_scales``), then Gaussian-smoothed with ``sigma`` px."""
  return anomaly.smooth_maps(np.asarray(anomaly.combine_scales(list(scores_by_scale), size)),
                             sigma)


# ----------------------------------------------------------------------------
# Evaluation records of a grid of rows
# ----------------------------------------------------------------------------


def row_params(params_R, i: int):
  """Row ``i`` of a grid's parameters (every leaf has a leading row axis)."""
  return jax.tree.map(lambda a: a[i], params_R)


def evaluate_rows(cfg, program: train_lib.FlowProgram, params_R, data, *,
                  rungs: bool = False) -> list[dict]:
  """Every row's evaluation record (one compiled scorer for all rows):

  * ``metrics``: image/pixel AUROC, pixel AP, AUPRO, F1-max on the test split;
  * ``val``: percentiles / mean / tail gap of patch NLL on the held-out *normal*
    images (model selection and L2; absent when ``data.val_fraction`` is 0);
  * ``boundary``: pixel AP and FPR@TPR on the defect border band vs interior (L3);
  * ``boot`` and ``by_kind`` (``eval.n_boot`` > 0; ``resampled_metrics``): pixel AP and
    image AUROC on ``eval.n_boot`` bootstrap resamples of the test images (the same
    resamples for every row, ``test_weights``) and per defect kind;
  * ``rungs`` (``rungs=True`` and a ladder, ``data.rungs``): per rung of the difficulty
    ladder, ``{"metrics": {pixel_ap, image_auroc}, "boot", "by_kind"}`` of the same row
    on that rung's test split (study A scores the rungs at the last budget).

  ``data`` is a ``pipeline.CategoryData``; for a multi-scale run the validation NLL is
  the reference scale's (``backbone.layer``), as the analyses see it.
  """
  with_rungs = bool(rungs and data.rungs)
  scored = [_row_scores(cfg, program, row_params(params_R, i), data, with_rungs)   # device
            for i in range(jax.tree.leaves(params_R)[0].shape[0])]
  # The host metrics are a deterministic function of the scores: rows whose scores
  # are bit-identical get one computation. At step 0 that is every row (the flow starts as
  # the identity map whatever the seed, ``flows``), so the ladder's first point costs one
  # evaluation per category instead of one per row.
  first_of: dict[bytes, int] = {}
  source_R = [first_of.setdefault(_digest(item), i) for i, item in enumerate(scored)]
  unique = sorted(set(source_R))
  # The host metrics (sorts of every test pixel) dominate an evaluation; NumPy releases
  # the GIL in them, so rows run in parallel threads, one per core.
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, min(len(unique), os.cpu_count() or 1))) as ex:
    recs = dict(zip(unique, ex.map(lambda j: _host_record(cfg, data, *scored[j]), unique)))
  return [copy.deepcopy(recs[j]) for j in source_R]


def _row_scores(cfg, program: train_lib.FlowProgram, params, data, with_rungs: bool = False):
  """(test scores, validation NLL or None, per-rung test scores) of one row, computed
  on the device."""
  score = lambda feats, kind=cfg.eval.score: patch_scores(program.model, params, feats, kind,
                                                          conv_impl=program.conv_impl)
  scores = score(data.flow_feats("test"))
  rung_scores = tuple(score(r.flow_feats()) for r in data.rungs) if with_rungs else ()
  if not len(data.val_feats):
    return scores, None, rung_scores
  val_nll = score(data.flow_feats("val"), "nll")
  if data.multiscale:
    val_nll = val_nll[data.layers.index(int(cfg.backbone.layer))]
  return scores, val_nll, rung_scores


def _host_record(cfg, data, scores, val_nll, rung_scores=()) -> dict:
  """One row's record from its scores (host work: maps, metrics, border band, val NLL,
  resampled and per-kind metrics, rungs). The resamples of a test set depend only on
  its labels, ``eval.n_boot`` and ``seed`` (``test_weights``), so they are the same for
  every row and every budget."""
  e = cfg.eval
  n_boot = int(e.get("n_boot", 0))
  weights = lambda labels_N: (test_weights(labels_N, n_boot, int(cfg.seed)) if n_boot > 0
                              else np.zeros((0, len(labels_N))))
  m, maps, (maps32, img) = _evaluate(dict(e), scores, data.test_masks, data.test_labels)
  rec = {"metrics": m,
         "boundary": causal.boundary_metrics(maps, data.test_masks, int(e.boundary_px),
                                             float(e.fixed_tpr))}
  if val_nll is not None:
    rec["val"] = causal.normal_tail(val_nll)
  if n_boot > 0:
    res = resampled_metrics(maps32, data.test_masks, img, data.test_labels, data.test_types,
                            weights(data.test_labels))
    rec["boot"], rec["by_kind"] = res["boot"], res["by_kind"]
  if rung_scores:
    rec["rungs"] = []
    for rung, rs in zip(data.rungs, rung_scores):
      r_maps, r_img = maps_and_image_scores(dict(e), rs)
      res = resampled_metrics(r_maps.astype(np.float32), rung.test_masks, r_img, rung.test_labels, rung.test_types,
                              weights(rung.test_labels))
      rec["rungs"].append({"metrics": res["observed"], "boot": res["boot"],
                           "by_kind": res["by_kind"]})
  return rec


def _digest(tree) -> bytes:
  """SHA-256 of a tree's array leaves (shapes, dtypes and bytes, in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.digest()
