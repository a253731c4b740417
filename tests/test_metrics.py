"""Metrics against references: scikit-learn, brute-force threshold loops, and a
slow, independent AUPRO that follows the official MVTec definition literally."""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics

from tailjax import metrics

CHUNK_SIZES = (metrics.DEFAULT_CHUNK_SIZE, 7, 1)  # small ones split tie groups


# ----------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------


def _flood_fill_regions(mask_HxW: np.ndarray, connectivity: int) -> list[np.ndarray]:
  """Connected components by breadth-first search (no scipy), as boolean masks."""
  steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
  if connectivity == 8:
    steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
  h, w = mask_HxW.shape
  seen = np.zeros_like(mask_HxW, dtype=bool)
  regions = []
  for y0, x0 in zip(*np.nonzero(mask_HxW)):
    if seen[y0, x0]:
      continue
    region = np.zeros_like(seen)
    queue = collections.deque([(y0, x0)])
    seen[y0, x0] = True
    while queue:
      y, x = queue.popleft()
      region[y, x] = True
      for dy, dx in steps:
        v, u = y + dy, x + dx
        if 0 <= v < h and 0 <= u < w and mask_HxW[v, u] and not seen[v, u]:
          seen[v, u] = True
          queue.append((v, u))
    regions.append(region)
  return regions


def _reference_pro_curve(maps_NxHxW, masks_NxHxW, connectivity=8):
  """(FPR, PRO) at every distinct score, thresholds descending, from (0, 0)."""
  masks_NxHxW = masks_NxHxW.astype(bool)
  regions = [(i, r) for i, m in enumerate(masks_NxHxW)
             for r in _flood_fill_regions(m, connectivity)]
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps_NxHxW)[::-1]:
    above_NxHxW = maps_NxHxW >= t
    fprs.append(above_NxHxW[~masks_NxHxW].mean())
    pros.append(np.mean([above_NxHxW[i][r].mean() for i, r in regions]))
  return np.array(fprs), np.array(pros)


def _reference_aupro(maps_NxHxW, masks_NxHxW, fpr_limit, connectivity=8):
  fprs, pros = _reference_pro_curve(maps_NxHxW, masks_NxHxW, connectivity)
  inside = fprs <= fpr_limit
  area = np.trapezoid(pros[inside], fprs[inside])
  if fprs[inside][-1] < fpr_limit:
    j = np.argmax(fprs > fpr_limit)
    pro_at_limit = np.interp(fpr_limit, fprs[j - 1:j + 1], pros[j - 1:j + 1])
    area += 0.5 * (pros[j - 1] + pro_at_limit) * (fpr_limit - fprs[j - 1])
  return area / fpr_limit


def _brute_force_f1_max(scores, labels):
  scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
  best = 0.0
  for t in np.unique(scores):
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    best = max(best, 2 * tp / (2 * tp + fp + fn))
  return best


def _random_maps(seed, n=5, h=20, w=20, levels=12):
  """Maps with several regions per image, a diagonal-only contact, ties, a normal image."""
  rng = np.random.default_rng(seed)
  masks_NxHxW = np.zeros((n, h, w), dtype=np.uint8)
  for i in range(1, n):  # image 0 stays normal
    for _ in range(rng.integers(1, 4)):
      y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
      masks_NxHxW[i, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = 1
  # Two blocks touching only at a corner: one region under 8-connectivity.
  masks_NxHxW[1, :] = 0
  masks_NxHxW[1, 2:5, 2:5] = 1
  masks_NxHxW[1, 5:8, 5:8] = 1
  masks_NxHxW[1, 12:14, 12:18] = 1
  # Few score levels → many ties, also between normal and anomalous pixels.
  noise = rng.random((n, h, w))
  maps_NxHxW = np.round((0.6 * noise + 0.4 * masks_NxHxW * rng.random((n, h, w))) * levels)
  return (maps_NxHxW / levels).astype(np.float32), masks_NxHxW


# ----------------------------------------------------------------------------
# AUROC / AP / F1-max
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # packed-key / argsort paths
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seed,levels", [(0, 12), (1, 300), (2, 300)])
def test_pixel_auroc_and_ap_equal_sklearn_with_ties(seed, levels, chunk_size, dtype):
  maps, masks = _random_maps(seed, levels=levels)
  # Negative scores and ±0.0 (equal floats, different bits) must tie.
  maps = (maps - np.float32(0.5)).astype(dtype)
  zero = maps == 0
  assert zero.sum() >= 4
  maps[zero & (np.arange(maps.size).reshape(maps.shape) % 2 == 0)] = -0.0
  y, s = masks.ravel(), maps.ravel()
  assert np.unique(s).size < s.size // 4  # the ties are really there
  if levels > 100:  # precision not monotone, so an interpolated AP would differ
    p, _, _ = sklearn.metrics.precision_recall_curve(y, s)
    assert np.any(np.diff(p[:-1]) < 0)
  np.testing.assert_allclose(
      metrics.pixel_auroc(maps, masks, chunk_size=chunk_size),
      sklearn.metrics.roc_auc_score(y, s), rtol=1e-12)
  np.testing.assert_allclose(
      metrics.pixel_ap(maps, masks, chunk_size=chunk_size),
      sklearn.metrics.average_precision_score(y, s), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_pixel_metrics_accept_other_dtypes(dtype):
  maps, masks = _random_maps(3)
  maps = (maps * 12).round().astype(dtype)
  np.testing.assert_allclose(metrics.pixel_auroc(maps, masks.astype(bool)),
                             sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel()),
                             rtol=1e-12)


def test_jax_arrays_are_accepted():
  maps, masks = _random_maps(4)
  np.testing.assert_allclose(metrics.pixel_ap(jnp.asarray(maps), jnp.asarray(masks)),
                             metrics.pixel_ap(maps, masks), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_image_auroc_equals_pairwise_probability(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, size=40).astype(np.float32)  # heavy ties
  labels = rng.random(40) < 0.4
  pos, neg = scores[labels], scores[~labels]
  expected = (np.mean(pos[:, None] > neg[None, :])
              + 0.5 * np.mean(pos[:, None] == neg[None, :]))
  np.testing.assert_allclose(metrics.image_auroc(scores, labels), expected, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_f1_max_equals_brute_force_at_image_and_pixel_level(chunk_size):
  rng = np.random.default_rng(5)
  scores = rng.integers(0, 10, size=60).astype(np.float64)
  labels = (rng.random(60) < 0.3).astype(int)
  assert metrics.f1_max(scores, labels, chunk_size=chunk_size) == pytest.approx(
      _brute_force_f1_max(scores, labels), rel=1e-12)
  maps, masks = _random_maps(6)
  assert metrics.f1_max(maps, masks, chunk_size=chunk_size) == pytest.approx(
      _brute_force_f1_max(maps, masks), rel=1e-12)
  # ... and the max of 2PR/(P+R) over sklearn's precision-recall curve.
  p, r, _ = sklearn.metrics.precision_recall_curve(masks.ravel(), maps.ravel())
  f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
  assert metrics.f1_max(maps, masks) == pytest.approx(f1.max(), rel=1e-12)


def test_perfect_map_scores_one_everywhere():
  rng = np.random.default_rng(7)
  _, masks = _random_maps(7)
  # Anomalous pixels all above normal ones, with ties inside each class.
  maps = masks + 0.5 * np.round(rng.random(masks.shape) * 4) / 4
  assert metrics.pixel_auroc(maps, masks) == 1.0
  assert metrics.pixel_ap(maps, masks) == 1.0
  assert metrics.f1_max(maps, masks) == 1.0
  assert metrics.aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)
  # Σ 1/|r| over a region's pixels rounds (as in the official code), hence approx.
  assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_equals_slow_reference_with_ties(seed, fpr_limit, chunk_size):
  maps, masks = _random_maps(seed)
  got = metrics.aupro(maps, masks, fpr_limit, chunk_size=chunk_size)
  assert got == pytest.approx(_reference_aupro(maps, masks, fpr_limit), rel=1e-9, abs=1e-12)


def test_aupro_equals_slow_reference_with_distinct_scores():
  maps, masks = _random_maps(8, n=4, h=14, w=14, levels=10**6)
  maps = maps + np.random.default_rng(8).random(maps.shape) * 1e-3  # ~no ties
  assert metrics.aupro(maps, masks) == pytest.approx(
      _reference_aupro(maps, masks, 0.3), rel=1e-9)


def test_aupro_when_the_limit_is_exactly_a_curve_point():
  maps, masks = _random_maps(9)
  fprs, _ = _reference_pro_curve(maps, masks)
  limit = float(fprs[np.argmin(np.abs(fprs - 0.2))])  # no interpolation needed
  assert metrics.aupro(maps, masks, limit) == pytest.approx(
      _reference_aupro(maps, masks, limit), rel=1e-9)


def test_aupro_uses_8_connectivity_per_image():
  masks = np.zeros((2, 6, 6), dtype=np.uint8)
  masks[0, 1, 1] = masks[0, 2, 2] = 1  # diagonal contact only → one region
  masks[0, 4:6, 4:6] = 1
  # Image 1's pixel at row 0 sits "below" image 0's row 5: must not connect.
  masks[1, 0, 4] = 1
  maps = np.zeros(masks.shape, dtype=np.float32)
  maps[0, 1, 1], maps[0, 2, 2] = 0.9, 0.1
  maps[0, 4:6, 4:6] = 0.5
  maps[1, 0, 4] = 0.7
  maps[0, 0, 0], maps[1, 3, 3] = 0.6, 0.3  # false positives shape the curve
  got = metrics.aupro(maps, masks, 1.0)
  assert got == pytest.approx(_reference_aupro(maps, masks, 1.0, connectivity=8), rel=1e-12)
  # The test can tell connectivities apart.
  assert abs(got - _reference_aupro(maps, masks, 1.0, connectivity=4)) > 1e-3


def test_aupro_constant_map_is_half_the_limit():
  _, masks = _random_maps(10)
  maps = np.full(masks.shape, 0.25, dtype=np.float32)
  for limit in (0.3, 1.0):
    assert metrics.aupro(maps, masks, limit) == pytest.approx(limit / 2, rel=1e-12)


def test_aupro_never_exceeds_one():
  for seed in range(20):
    rng = np.random.default_rng(seed)
    _, masks = _random_maps(seed, n=3, h=12, w=12)
    # Nearly perfect maps, region sizes like 3 or 10 whose 1/|r| sums round.
    maps = masks * (1 + rng.random(masks.shape)) + 0.2 * rng.random(masks.shape)
    for limit in (0.01, 0.3, 1.0):
      assert 0.0 <= metrics.aupro(maps, masks, limit) <= 1.0


# ----------------------------------------------------------------------------
# evaluate / aggregation
# ----------------------------------------------------------------------------


def test_evaluate_matches_individual_metrics():
  maps, masks = _random_maps(11)
  image_scores = maps.max(axis=(1, 2))
  labels = masks.any(axis=(1, 2))
  got = metrics.evaluate(maps, masks, image_scores, labels, chunk_size=13)
  assert set(got) == {"image_auroc", "pixel_auroc", "pixel_ap", "aupro",
                      "image_f1_max", "pixel_f1_max"}
  assert all(type(v) is float for v in got.values())
  assert got["image_auroc"] == metrics.image_auroc(image_scores, labels)
  assert got["image_f1_max"] == metrics.f1_max(image_scores, labels)
  assert got["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(maps, masks), rel=1e-12)
  assert got["pixel_ap"] == pytest.approx(metrics.pixel_ap(maps, masks), rel=1e-12)
  assert got["aupro"] == pytest.approx(metrics.aupro(maps, masks), rel=1e-12)
  assert got["pixel_f1_max"] == pytest.approx(metrics.f1_max(maps, masks), rel=1e-12)
  assert metrics.evaluate(maps, masks, image_scores) == pytest.approx(got, rel=1e-12)


def test_mean_over_categories():
  rows = {"a": {"pixel_ap": 0.5, "aupro": 0.9}, "b": {"aupro": 0.7, "pixel_ap": 0.25}}
  assert metrics.mean_over_categories(rows) == pytest.approx(
      {"pixel_ap": 0.375, "aupro": 0.8})
  with pytest.raises(ValueError, match=r"per_category\['b'\]"):
    metrics.mean_over_categories({"a": {"aupro": 0.9}, "b": {"pixel_ap": 0.2}})
  with pytest.raises(ValueError, match="not finite"):
    metrics.mean_over_categories({"a": {"aupro": float("nan")}})
  with pytest.raises(ValueError, match="empty"):
    metrics.mean_over_categories({})


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro])
def test_all_normal_test_set_is_an_error(fn):
  maps, masks = _random_maps(12)
  with pytest.raises(ValueError, match="no anomalous pixels"):
    fn(maps, np.zeros_like(masks))


def test_all_normal_labels_are_an_error():
  with pytest.raises(ValueError, match="labels_N has no anomalous images"):
    metrics.image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
  with pytest.raises(ValueError, match="labels has no anomalous"):
    metrics.f1_max([0.1, 0.2, 0.3], [0, 0, 0])


def test_bad_inputs_name_the_field():
  maps, masks = _random_maps(13)
  with pytest.raises(ValueError, match="masks_NxHxW shape"):
    metrics.pixel_auroc(maps, masks[:, :-1])
  with pytest.raises(ValueError, match=r"maps_NxHxW must have shape \[N, H, W\]"):
    metrics.aupro(maps[0], masks[0])
  bad_maps = maps.copy()
  bad_maps[2, 3, 4] = np.nan
  with pytest.raises(ValueError, match="maps_NxHxW must be finite; found 1 NaN"):
    metrics.pixel_ap(bad_maps, masks)
  with pytest.raises(ValueError, match="masks_NxHxW must be binary.*255"):
    metrics.aupro(maps, masks * 255)
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.aupro(maps, masks, fpr_limit=0.0)
  with pytest.raises(ValueError, match="image_scores_N"):
    metrics.evaluate(maps, masks, np.ones(3))
  with pytest.raises(ValueError, match="labels_N shape"):
    metrics.image_auroc([0.1, 0.2], [0, 1, 1])
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.pixel_auroc(maps, masks, chunk_size=0)


@pytest.mark.parametrize("seed", range(6))
def test_ap_and_fpr_against_sorted_negatives_equal_sklearn_and_the_sorting_rule(seed):
  """Shared-negatives AP and FPR@TPR equal sklearn's AP and its ROC curve's first
  threshold reaching the TPR on the concatenation, ties included (scores rounded to few
  distinct values)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(50, 3000))
  s = np.round(rng.normal(size=n), seed % 3).astype(np.float32)
  y = rng.random(n) < rng.uniform(0.05, 0.5)
  y[:2] = [True, False]
  for tpr in (0.5, 0.8, 1.0):
    ap, fpr = metrics.ap_and_fpr_against_negatives(np.sort(s[~y]), s[y], tpr)
    np.testing.assert_allclose(ap, sklearn.metrics.average_precision_score(y, s), rtol=1e-10)
    roc_fpr, roc_tpr, _ = sklearn.metrics.roc_curve(y, s)
    assert fpr == pytest.approx(roc_fpr[np.argmax(roc_tpr >= tpr - 1e-12)], abs=1e-12)


# ----------------------------------------------------------------------------
# Pixel AP on bootstrap resamples of the test images (multiplicities)
# ----------------------------------------------------------------------------


def _repeated_ap(maps, masks, w_N):
  rep = np.repeat(np.arange(len(maps)), np.asarray(w_N).astype(int))
  y = masks[rep].ravel()
  return sklearn.metrics.average_precision_score(y, maps[rep].ravel()) if y.any() else np.nan


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # packed-key / argsort paths
@pytest.mark.parametrize("chunk_size,block_size", [(metrics.DEFAULT_CHUNK_SIZE, 1 << 21),
                                                   (7, 1 << 21), (1, 3), (13, 1)])
@pytest.mark.parametrize("seed,levels", [(0, 12), (1, 300)])
def test_pixel_ap_resamples_equal_sklearn_on_repeated_images(seed, levels, chunk_size,
                                                             block_size, dtype):
  """Each resample's AP equals sklearn's on the test set with every image repeated by its
  multiplicity (few score levels: ties within and across images, between normal and
  anomalous pixels; small chunks split tie groups; resamples without an anomalous
  pixel give NaN)."""
  maps, masks = _random_maps(seed, n=7, levels=levels)
  maps = maps.astype(dtype)
  assert np.unique(maps).size < maps.size // 4           # the ties are really there
  rng = np.random.default_rng(seed)
  w_RxN = rng.multinomial(7, np.full(7, 1 / 7), size=9).astype(np.float64)
  w_RxN[0] = 1.0                                          # the observed test set
  w_RxN[1] = 0.0
  w_RxN[1, 0] = 7.0                                       # only the normal image
  got = metrics.pixel_ap_resamples(maps, masks, w_RxN, chunk_size=chunk_size,
                                   block_size=block_size)
  ref = [_repeated_ap(maps, masks, w) for w in w_RxN]
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  assert got[0] == pytest.approx(metrics.pixel_ap(maps, masks), rel=1e-12)
  assert np.isnan(got[1])


def test_pixel_ap_resamples_fractional_weights_are_sample_weights():
  maps, masks = _random_maps(2, n=6, levels=40)
  w_RxN = np.random.default_rng(2).uniform(0.0, 2.0, (4, 6))
  got = metrics.pixel_ap_resamples(maps, masks, w_RxN, chunk_size=11, block_size=5)
  for r in range(4):
    sw = np.repeat(w_RxN[r], maps[0].size)
    ref = sklearn.metrics.average_precision_score(masks.ravel(), maps.ravel(), sample_weight=sw)
    assert got[r] == pytest.approx(ref, rel=1e-10)


def test_pixel_ap_resamples_bad_weights_name_the_field():
  maps, masks = _random_maps(0)
  with pytest.raises(ValueError, match="weights_RxN must have shape \\[R, 5\\]"):
    metrics.pixel_ap_resamples(maps, masks, np.ones(5))
  with pytest.raises(ValueError, match="weights_RxN must be finite and >= 0"):
    metrics.pixel_ap_resamples(maps, masks, -np.ones((2, 5)))
