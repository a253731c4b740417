"""Causal-chain statistics: planted effects are found, nulls are not."""

import jax
import numpy as np
import pytest

from tailjax import flows, losses
from tailjax.analysis import causal, gradients


def test_image_level_h1_finds_a_planted_effect_and_keeps_its_level_under_the_null():
  rng = np.random.default_rng(0)
  b, n, k = 40, 196, 4
  tail = np.zeros((b, n), bool)
  for i in range(b):
    tail[i, rng.choice(n, k, replace=False)] = True
  # Null with strong within-image correlation: every image has its own level.
  rejections = 0
  for s in range(200):
    r = np.random.default_rng(s)
    v = r.normal(size=(b, 1)) * 3 + r.normal(size=(b, n))
    rejections += causal.image_level_contrast(v, tail)["wilcoxon_p"] < 0.05
  assert rejections / 200 <= 0.10
  planted = rng.normal(size=(b, n)) + 0.8 * tail
  res = causal.image_level_contrast(planted, tail)
  assert res["wilcoxon_p"] < 1e-4 and res["diff"]["lo"] > 0 and res["n_images"] == b


def test_border_distance_contrast_sign():
  h = w = 6
  n = h * w
  border = np.zeros((10, n), bool)
  border[:, [0, 1, 2, 3]] = True                       # the top row: distance 0
  res = causal.border_distance_contrast(border, (h, w))
  assert res["diff"]["mean"] < 0 and res["wilcoxon_p"] < 0.01


def _tiny_flow():
  model = flows.build_flow({"channels": 4, "num_steps": 2, "kernel_mode": "1x1",
                            "hidden_ratio": 2.0, "layer_norm": "none"})
  x = np.ones((1, 3, 3, 4), np.float32)
  params = model.init(jax.random.key(0), x)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(kk, l.shape)
                                     for l, kk in zip(leaves, keys)])
  return model, params


def test_l1_share_equals_construction_when_patches_are_identical():
  """Identical patches have identical gradients: the update share is exactly the weight
  share λ + (1 − λ)·k/N — the null holds by construction, and the test says so."""
  model, params = _tiny_flow()
  x = np.tile(np.random.default_rng(0).normal(size=(1, 1, 1, 4)), (3, 3, 3, 1)).astype(np.float32)
  lam, r = 0.7, 2 / 9
  nll = gradients.batch_nll(model, params, x)
  tail = np.zeros(nll.shape, bool)
  tail[:, :2] = True                                    # ties: any k patches are "the tail"
  k, n = 2, 9
  w = (1 - lam) / n + lam * tail / k
  share = causal.per_image_update_share(model, params, x, w, tail)
  null = causal.construction_null(lam, k, n)
  np.testing.assert_allclose(share, null, rtol=1e-4)
  res = causal.l1_excess(share + np.random.default_rng(1).normal(0, 1e-6, 3), null)
  assert not res["beyond"]


def test_l1_share_matches_per_patch_gradients_and_detects_planted_excess():
  model, params = _tiny_flow()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3, 3, 4)).astype(np.float32)
  x[:, 0, 0] *= 4.0                                     # a steep patch in every image
  lam, r = 0.5, 1 / 9
  nll = gradients.batch_nll(model, params, x)
  tail = gradients.tail_mask(nll, r)
  w = gradients.loss_weights(nll, lam, r)
  share = causal.per_image_update_share(model, params, x, w, tail)
  # Brute force from exact per-patch gradients.
  per = gradients.per_patch_param_grads(model, params, x, w, method="jacrev",
                                        return_grads=True)
  g = per.grads
  for b in range(6):
    flat = np.concatenate([np.asarray(l[b]).reshape(9, -1) for l in jax.tree.leaves(g)], axis=1)
    gb = flat.sum(0)
    np.testing.assert_allclose(share[b], flat[tail[b]].sum(0) @ gb / (gb @ gb), rtol=1e-4)
  null = causal.construction_null(lam, 1, 9)
  res = causal.l1_excess(share, null)
  assert res["beyond"] and res["share"] > null


def test_normal_tail_orders_heavier_tails():
  rng = np.random.default_rng(0)
  light = causal.normal_tail(rng.normal(size=20000))
  heavy = causal.normal_tail(rng.standard_t(3, size=20000))
  assert heavy["gap"] > light["gap"] > 0 and set(light) >= {"p50", "p98", "p99.5", "mean"}


def test_boundary_metrics_separate_band_and_interior():
  masks = np.zeros((2, 20, 20), np.uint8)
  masks[0, 5:15, 5:15] = 1
  band, interior = causal.boundary_bands(masks, 2)
  assert band[0].sum() == 100 - 36 and interior[0].sum() == 36 and not band[1].any()
  maps = np.random.default_rng(0).uniform(0, 1, masks.shape).astype(np.float32)
  maps[band] += 2.0                                     # the border is found, the interior not
  res = causal.boundary_metrics(maps, masks, 2, tpr=0.8)
  assert res["band"]["ap"] == pytest.approx(1.0) and res["band"]["fpr_at_tpr"] == 0.0
  assert res["interior"]["ap"] < 0.2 and res["interior"]["fpr_at_tpr"] > 0.5


def test_fpr_at_tpr_against_sklearn_roc():
  from sklearn.metrics import roc_curve
  rng = np.random.default_rng(3)
  y = rng.uniform(size=500) < 0.3
  s = np.round(rng.normal(size=500) + y, 1)             # ties
  fpr, tpr, _ = roc_curve(y, s)
  for target in (0.25, 0.5, 0.8):
    assert causal.fpr_at_tpr(s, y, target) == pytest.approx(fpr[np.argmax(tpr >= target)])


def test_h4_purity_against_an_independent_model():
  from tailjax.analysis import hypotheses as H
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 196))
  same = H.topk_dilution(a, (0.02,), hard_nll_BxN=a)["rows"][0]
  other = H.topk_dilution(a, (0.02,), hard_nll_BxN=rng.normal(size=(50, 196)))
  assert same["purity"] > 0.5 and other["independent"]
  assert abs(other["rows"][0]["purity"] - other["chance_purity"]) < 0.03
  assert same["k"] == 4 and same["amplification"] == 49


def _brute_topk(score_N, k):
  """The k highest scores' indices, ties by index (rank by (−score, index))."""
  order = sorted(range(len(score_N)), key=lambda i: (-score_N[i], i))
  return set(order[:k])


@pytest.mark.parametrize("r", [0.02, 0.1, 0.25, 0.5])
def test_topk_jaccard_matches_brute_force_sets_with_ties(r):
  rng = np.random.default_rng(0)
  n = 49
  # Few distinct values: many ties at the k-th place, broken by index as the loss does.
  a = rng.integers(0, 4, (6, n)).astype(np.float32)
  b = np.where(rng.random((6, n)) < 0.5, a, rng.integers(0, 4, (6, n))).astype(np.float32)
  b[0] = a[0]                                      # identical scores: overlap 1
  b[1] = -a[1]                                     # reversed ranking
  k = int(losses.top_k_count(r, n))
  assert k == max(1, round(r * n))
  want = [len(_brute_topk(x, k) & _brute_topk(y, k)) / len(_brute_topk(x, k) | _brute_topk(y, k))
          for x, y in zip(a, b)]
  got = causal.topk_jaccard(a, b, r)
  assert got.shape == (6,)
  np.testing.assert_allclose(got, want)
  assert got[0] == 1.0
  # A monotone transform of a score picks the same set; an even share constant per image
  # (the even-share definition's only difference from ½‖z‖²) does too.
  np.testing.assert_array_equal(causal.topk_jaccard(a, 3.0 * a - a.mean(1, keepdims=True), r), 1.0)
  with pytest.raises(ValueError, match="topk_jaccard"):
    causal.topk_jaccard(a, b[:, :-1], r)


def test_overlap_summary():
  s = causal.overlap_summary(np.linspace(0.0, 1.0, 11))
  assert s["n_images"] == 11 and s["median"] == pytest.approx(0.5)
  assert s["p10"] == pytest.approx(0.1) and s["mean"]["mean"] == pytest.approx(0.5)
  assert causal.overlap_summary([]) == {"n_images": 0}
